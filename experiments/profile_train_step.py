"""Where a CPU training step's time goes: sdjax's against eager PyTorch's, by kind of operation.

`bench_train` times whole steps; this profiles them. The same step as bench_train's (64 px,
batch 32 x 2 views, float32), each implementation in its own process:
- sdjax under `jax.profiler`: the time of each XLA operation of the compiled step, grouped into
  convolutions and matmuls (YNNPACK fusions, dots, convolutions), and everything else
  (GroupNorm, ReLU, AdamW, copies);
- PyTorch eager under `torch.profiler`: the self time of oneDNN's convolutions (forward and
  backward), GroupNorm (forward and backward), and everything else;
- sdjax's matmuls in the step and alone: each dot of the compiled step that XLA:CPU hands to
  YNNPACK (the 1x1 and im2col convolutions and the head, forward and input gradients), its time
  in the profiled step, how much of it another operation ran beside it, and the same dot
  (operands of the same shapes, the same dimension numbers) jitted by itself. The dots XLA runs
  itself (the weight gradients of those layers) are counted but not timed: their trace events
  do not time their work;
- sdjax's step again with XLA:CPU's dots and convolutions handed to each library it can use,
  and under the runtime's scheduling and threading flags (`XLA_FLAG_VARIANTS`),
  `--flag_rounds` times, the variants alternating.
XLA runs independent operations on both cores at once, so sdjax's operation times can add up
to more than its step. Writes `results/profile_train_step.{json,md}`. About 10 minutes on the
2-core CPU; run it with nothing else on the machine.

COMMAND:
  python -m experiments.profile_train_step --profile_archs=resnet50,resnet18
"""

from __future__ import annotations

import collections
import datetime
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from absl import app, flags

if __package__ in (None, ""):  # run as a script (the PyTorch worker): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import bench_train
from experiments.bench_loss import cpu_model, interpreter, torch_version, worker_json
from sdjax import host_memory

FLAGS = flags.FLAGS
flags.DEFINE_list("profile_archs", ["resnet50"], f"Networks, from {sorted(bench_train.ARCHS)}.")
flags.DEFINE_list("flag_archs", ["resnet50"], "Networks timed under each XLA flag variant.")
flags.DEFINE_integer("flag_rounds", 2, "Rounds of the XLA flag variants.")
flags.DEFINE_string("profile_worker", "", "Internal: IMPL,ARCH, one profile.")
flags.DEFINE_string("time_worker", "", "Internal: ARCH, sdjax's step time alone.")

BATCH_SIZE, IMAGE_SIZE, WARMUP_STEPS, TIMED_STEPS, PROFILED_STEPS = 32, 64, 2, 5, 2
SDJAX_MATMULS = re.compile(r"^(ynn_fusion|dot|conv|convolution|.*_dot_|.*convolution)")
TORCH_KINDS = {
    "aten::mkldnn_convolution": "convolutions and matmuls",
    "aten::convolution_backward": "convolutions and matmuls",
    "aten::mm": "convolutions and matmuls",
    "aten::addmm": "convolutions and matmuls",
    "aten::native_group_norm": "GroupNorm",
    "aten::native_group_norm_backward": "GroupNorm",
}
KINDS = ("convolutions and matmuls", "GroupNorm", "everything else")
# Which library XLA:CPU hands its dots and convolutions to: sdjax's step under each, each in
# its own process, the variants alternating.
XLA_FLAG_VARIANTS = {
    "default (YNNPACK)": "",
    "YNNPACK for dots only": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "no YNNPACK (XLA's own)": "--xla_cpu_experimental_ynn_fusion_type=",
    "oneDNN for dots": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "XNNPACK for dots": "--xla_cpu_experimental_ynn_fusion_type= "
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    # The runtime: whether operations that could run at once are scheduled to, and on what.
    "concurrency-optimised scheduler off": "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "the old runtime (no thunks)": "--xla_cpu_use_thunk_runtime=false",
    "Eigen on one thread": "--xla_cpu_multi_thread_eigen=false",
    "512-bit vectors": "--xla_cpu_prefer_vector_width=512",
}
# How many of the step's matmuls the table lists, slowest in the step first (all are summed).
LISTED_MATMULS = 12


def median_step_ms(run) -> float:
    """The median of `TIMED_STEPS` steps after the warm-up, unprofiled: a profiler slows
    Python (nnx's graph traversal under jax.profiler), not the operations."""
    for _ in range(WARMUP_STEPS):
        run()
    times = []
    for _ in range(TIMED_STEPS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def sdjax_profile(arch: str) -> dict:
    import jax

    run, _, _, compiled = bench_train.sdjax_step(arch, BATCH_SIZE, IMAGE_SIZE, 0, False)
    step_ms = median_step_ms(run)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(PROFILED_STEPS):
                run()
        events = trace_events(Path(trace_dir))
    return {
        "step_ms": step_ms,
        "kinds_ms": xla_operation_ms(events, PROFILED_STEPS),
        "matmuls": matmuls_in_step_and_alone(
            events, compiled_dots(compiled.as_text()), PROFILED_STEPS
        ),
    }


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", re.S | re.M)
_SHAPE = re.compile(r"%([\w.-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"%([\w.-]+) = [^\n]*? dot\(%([\w.-]+), %([\w.-]+)\)([^\n]*)")
_FUSION = re.compile(r"%([\w.-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.-]+)([^\n]*)")


def _dimensions(attributes: str, key: str) -> list[int]:
    """A dot's dimension numbers `key` from its HLO attributes ("lhs_contracting_dims={1}")."""
    found = re.search(key + r"=\{([\d,]*)\}", attributes)
    return [int(d) for d in found.group(1).split(",") if d] if found else []


def compiled_dots(program: str) -> dict[str, dict]:
    """{operation: its dot} for every dot of a compiled program's HLO text, keyed by the name
    its trace events carry (the fusion's, for a dot inside one): the operands' shapes, the
    dimension numbers of `lax.dot_general`, the dot's FLOPs, and what runs it ("YNNPACK" for a
    YNNPACK fusion's dot, "XLA" for a dot of XLA's own, outside any fusion).

    Dots inside other fusions are left out (XLA:CPU makes none here)."""
    fusions = {
        computation: (fusion, rest) for fusion, computation, rest in _FUSION.findall(program)
    }
    dots = {}
    for computation, body in _COMPUTATION.findall(program):
        fusion, rest = fusions.get(computation, (None, ""))
        if fusion is not None and "__ynn_fusion" not in rest:
            continue
        shapes = {
            name: [int(d) for d in dims.split(",") if d] for name, dims in _SHAPE.findall(body)
        }
        for name, lhs, rhs, attributes in _DOT.findall(body):
            contracting = _dimensions(attributes, "lhs_contracting_dims")
            batch = _dimensions(attributes, "lhs_batch_dims")
            lhs_shape, rhs_shape = shapes[lhs], shapes[rhs]
            summed = int(np.prod([lhs_shape[d] for d in contracting]))
            batched = int(np.prod([lhs_shape[d] for d in batch]))
            # [batch, lhs free, rhs free]: each operand's size over what it shares with the other
            outputs = (
                int(np.prod(lhs_shape)) // summed * (int(np.prod(rhs_shape)) // (summed * batched))
            )
            dots[fusion or name] = {
                "library": "XLA" if fusion is None else "YNNPACK",
                "lhs": lhs_shape,
                "rhs": rhs_shape,
                "dimension_numbers": (
                    (contracting, _dimensions(attributes, "rhs_contracting_dims")),
                    (batch, _dimensions(attributes, "rhs_batch_dims")),
                ),
                "flops": 2 * outputs * summed,
            }
    return dots


def covered(interval: tuple[float, float], others: list[tuple[float, float]]) -> float:
    """How much of `interval` (start, end) the union of `others` covers, in their unit."""
    start, end = interval
    total, reached = 0.0, start
    for other_start, other_end in sorted(others):
        other_start, other_end = max(other_start, reached), min(other_end, end)
        if other_end > other_start:
            total += other_end - other_start
            reached = other_end
    return total


def dot_alone_ms(dot: dict) -> float:
    """The median time of the same dot, jitted by itself on random operands (`dot["lhs"]`
    and `dot["rhs"]`: their shapes)."""
    import jax
    from jax import lax

    rng = np.random.default_rng(0)
    # On the device first: NumPy operands would be copied in at every call, and timed.
    lhs, rhs = (
        jax.device_put(rng.normal(size=dot[side]).astype(np.float32)) for side in ("lhs", "rhs")
    )
    alone = jax.jit(lambda a, b: lax.dot_general(a, b, dot["dimension_numbers"]))
    return median_step_ms(lambda: jax.block_until_ready(alone(lhs, rhs)))


def matmuls_in_step_and_alone(events: list[dict], dots: dict[str, dict], steps: int) -> list:
    """Every dot of the profiled step, slowest first: its time per step, how much of it
    another operation ran alongside, and the same dot's time alone."""
    operations = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    spans = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in operations]
    matmuls, alone_ms = [], {}  # alone_ms: by operands and dimension numbers, timed once
    for name, dot in dots.items():
        own = [(start, end) for start, end, other in spans if other == name]
        if not own:
            continue
        concurrent = sum(
            covered(
                (start, end),
                [(s, e) for s, e, other in spans if other != name and s < end and e > start],
            )
            for start, end in own
        )
        same_dot = json.dumps([dot["lhs"], dot["rhs"], dot["dimension_numbers"]])
        if same_dot not in alone_ms:
            alone_ms[same_dot] = dot_alone_ms(dot)
        matmuls.append(
            {
                "operation": name,
                "library": dot["library"],
                "lhs": dot["lhs"],
                "rhs": dot["rhs"],
                "flops": dot["flops"],
                "step_ms": sum(end - start for start, end in own) / 1e3 / steps,
                "concurrent_ms": concurrent / 1e3 / steps,
                "alone_ms": alone_ms[same_dot],
            }
        )
    return sorted(matmuls, key=lambda matmul: -matmul["step_ms"])


def trace_events(trace_dir: Path) -> list[dict]:
    """The events of the one trace that `jax.profiler.trace(trace_dir)` wrote."""
    (trace,) = trace_dir.rglob("*.trace.json.gz")
    return json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def xla_operation_ms(events: list[dict], steps: int) -> dict[str, float]:
    """{kind: milliseconds per step} of the compiled program's operations among `events`: those
    that name their HLO operation, not Python's nor the runtime's (dispatch, buffers, threads).
    A dot or convolution, YNNPACK's fusions included, is "convolutions and matmuls"."""
    kinds: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") != "X" or "hlo_op" not in event.get("args", {}):
            continue
        kind = "convolutions and matmuls" if SDJAX_MATMULS.match(event["name"]) else KINDS[-1]
        kinds[kind] += event["dur"] / 1e3 / steps
    return dict(kinds)


def torch_profile(arch: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    run, _ = bench_train.torch_step(arch, BATCH_SIZE, IMAGE_SIZE, False, False)
    step_ms = median_step_ms(run)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(PROFILED_STEPS):
            run()
    kinds: collections.Counter = collections.Counter()
    for average in profiler.key_averages():
        kind = TORCH_KINDS.get(average.key, "everything else")
        kinds[kind] += average.self_cpu_time_total / 1e3 / PROFILED_STEPS
    return {"step_ms": step_ms, "kinds_ms": dict(kinds)}


def time_flag_variants(arch: str, rounds: int) -> dict[str, list[float]]:
    """{variant: sdjax's median step (ms) in each round} under each of `XLA_FLAG_VARIANTS`."""
    command = [interpreter("sdjax"), "-m", "experiments.profile_train_step"]
    steps: dict[str, list[float]] = {variant: [] for variant in XLA_FLAG_VARIANTS}
    for _ in range(rounds):
        for variant, xla_flags in XLA_FLAG_VARIANTS.items():
            print(f"{arch} sdjax, {variant}: timing", flush=True)
            with mock.patch.dict(os.environ, {"XLA_FLAGS": xla_flags}):
                timed = worker_json([*command, f"--time_worker={arch}"], gpu=False)
            steps[variant].append(timed["step_ms"])
    return steps


def matmul_lines(row: dict) -> list[str]:
    """The table of a profiled sdjax step's matmuls, in the step and alone; none for PyTorch."""
    if not row.get("matmuls"):
        return []
    matmuls = [m for m in row["matmuls"] if m["library"] == "YNNPACK"]
    xla_own = [m for m in row["matmuls"] if m["library"] == "XLA"]

    def achieved(group):
        gflop = sum(matmul["flops"] for matmul in group) / 1e9
        step_ms = sum(matmul["step_ms"] for matmul in group)
        rate = gflop / step_ms * 1e3
        return f"{len(group)} ran {gflop:.1f} GFLOP in {step_ms:.0f} ms ({rate:.0f} GFLOP/s)"

    shared = [m for m in matmuls if m["concurrent_ms"] >= m["step_ms"] / 2]
    unshared = [m for m in matmuls if m["concurrent_ms"] < m["step_ms"] / 2]
    own_operands = ", ".join(f"{m['lhs']} x {m['rhs']}" for m in xla_own)
    lines = [
        "",
        f"sdjax's {row['arch']} step: its {len(matmuls)} matmuls in YNNPACK fusions (the 1x1 "
        "and im2col convolutions, forward and backward, and the head's forward and input "
        "gradients). In the profiled "
        "step, those that another operation ran beside for at least half their time: "
        f"{achieved(shared)}; the others: {achieved(unshared)}. XLA runs {len(xla_own)} more "
        f"dots itself ({own_operands}): by their "
        f"trace events, {achieved(xla_own)}; an event of XLA's own dot can end before its work "
        "does, so they are left out of this table. The "
        f"{min(LISTED_MATMULS, len(matmuls))} slowest YNNPACK matmuls in the step, and each "
        "alone (the same dot on operands of the same shapes, jitted by itself):",
        "",
        "| operation | operands | GFLOP | in the step (ms) | GFLOP/s | another running (ms) "
        "| alone (ms) | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for matmul in matmuls[:LISTED_MATMULS]:
        gflop = matmul["flops"] / 1e9
        lines.append(
            f"| {matmul['operation']} | {matmul['lhs']} x {matmul['rhs']} | {gflop:.2f} | "
            f"{matmul['step_ms']:.1f} | {gflop / matmul['step_ms'] * 1e3:.0f} | "
            f"{matmul['concurrent_ms']:.1f} | {matmul['alone_ms']:.1f} | "
            f"{gflop / matmul['alone_ms'] * 1e3:.0f} |"
        )
    return lines


def write_outputs(rows: list[dict], flag_steps: dict, header: list[str]) -> None:
    results = bench_train.RESULTS
    (results / "profile_train_step.json").write_text(
        json.dumps({"header": header, "rows": rows, "xla_flags": flag_steps}, indent=1) + "\n"
    )
    lines = [f"# Where a CPU training step's time goes ({cpu_model()})", "", *header, ""]
    lines += [
        "| network | implementation | step (ms) | "
        + " | ".join(f"{kind} (ms)" for kind in KINDS)
        + " |",
        "|---|---|---:|" + "---:|" * len(KINDS),
    ]
    for row in rows:
        # sdjax's GroupNorm is fused with its neighbours: not a kind of its own there.
        cells = [f"{row['kinds_ms'][k]:.0f}" if k in row["kinds_ms"] else "–" for k in KINDS]
        lines.append(
            f"| {row['arch']} | {row['impl']} | {row['step_ms']:.0f} | " + " | ".join(cells) + " |"
        )
    for row in rows:
        lines += matmul_lines(row)
    for arch, steps in flag_steps.items():
        lines += [
            "",
            f"sdjax's {arch} step (ms) with XLA:CPU's dots and convolutions in each library, and "
            "under the runtime's flags (`XLA_FLAGS`), one process per round and variant:",
            "",
            "| variant | XLA_FLAGS | step in each round | median |",
            "|---|---|---|---:|",
        ]
        for variant, times in steps.items():
            shown = ", ".join(f"{t:.0f}" for t in times)
            flags_shown = f"`{XLA_FLAG_VARIANTS[variant]}`" if XLA_FLAG_VARIANTS[variant] else ""
            lines.append(f"| {variant} | {flags_shown} | {shown} | {np.median(times):.0f} |")
    (results / "profile_train_step.md").write_text("\n".join(lines) + "\n")


def main(argv):
    del argv
    if FLAGS.time_worker:
        run, _, _, _ = bench_train.sdjax_step(FLAGS.time_worker, BATCH_SIZE, IMAGE_SIZE, 0, False)
        print(json.dumps({"step_ms": median_step_ms(run)}))
        return
    if FLAGS.profile_worker:
        impl, arch = FLAGS.profile_worker.split(",")
        profiled = sdjax_profile(arch) if impl == "sdjax" else torch_profile(arch)
        print(json.dumps(profiled))
        return
    rows = []
    for arch in FLAGS.profile_archs:
        for impl in ("sdjax", "torch_eager"):
            command = [interpreter(impl)] + (
                ["-m", "experiments.profile_train_step"] if impl == "sdjax" else [__file__]
            )
            print(f"{arch} {impl}: profiling", flush=True)
            profiled = worker_json([*command, f"--profile_worker={impl},{arch}"], gpu=False)
            rows.append({"arch": arch, "impl": impl, **profiled})
    flag_steps = {arch: time_flag_variants(arch, FLAGS.flag_rounds) for arch in FLAGS.flag_archs}
    import jax

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"- date: {now}, jax {jax.__version__}, torch {torch_version()}",
        f"- {IMAGE_SIZE}x{IMAGE_SIZE}x3 images, batch {BATCH_SIZE} x 2 views, float32, the step "
        "of `experiments.bench_train`",
        f"- step: the median of {TIMED_STEPS} unprofiled steps after {WARMUP_STEPS} warm-up "
        f"steps; then {PROFILED_STEPS} profiled steps, times per step. "
        "sdjax: XLA's operation times (both cores run operations at once, so they can add up to "
        "more than the step); PyTorch: operators' self CPU time",
        "- command: `python -m experiments.profile_train_step "
        f"--profile_archs={','.join(FLAGS.profile_archs)} "
        f"--flag_archs={','.join(FLAGS.flag_archs)} --flag_rounds={FLAGS.flag_rounds}`",
    ]
    write_outputs(rows, flag_steps, header)


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()  # as bench_train's step runs
    app.run(main)
