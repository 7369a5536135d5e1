"""Benchmark: the loss at the paper's scale, thousands of labels and a global batch over devices.

Two measurements, each configuration in a fresh child process:

1. **Label-space size.** fwd+bwd time and peak memory of `multilabel_supcon_loss` for every
   `positives`, at N samples x 2 views, D = 128 and 16 labels per sample, against C in
   {80, 1000, 8922} (8922: MIMIC-III-Full's ICD codes). "old" is the loss as it was before the
   label arithmetic became per-sample (`git show OLD_REV:sdjax/losses.py`, loaded from a temporary
   file in the child), on multi-hot labels; "new" is this checkout on multi-hot labels and on
   `LabelIndices`. All configurations of one `positives` are compiled in one child and timed
   alternately, round by round (the order reversed every other round), so that each ratio
   compares calls made under the same machine load; each call's wall and CPU time are kept.
   Peak memory is the compiled program's (arguments + temporaries + outputs).
2. **Global batch over devices.** Per-device memory of the sharded loss (`make_sharded_loss`,
   fwd+bwd, 8 fake CPU devices, `LabelIndices` with 16 labels) for the `all_gather` and `ring`
   exchanges at global batches up to 2^20 samples, from the compiled program's memory analysis
   (arguments + temporaries + outputs, per device; nothing is allocated), with a linear fit.

Writes `experiments/results/bench_loss_scaling.{md,json,png}`.

COMMAND (from the repository root):
  python -m experiments.bench_loss_scaling                 # both parts, the committed grid
  python -m experiments.bench_loss_scaling --part=labels --positives=sd --classes=80,8922
  python -m experiments.bench_loss_scaling --gpu --samples=65536   # on a GPU machine (part 1)
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.suite import cpu_model
from sdjax.losses import POSITIVES

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "experiments" / "results"
FEATURE_DIM = 128
NUM_VIEWS = 2
LABELS_PER_SAMPLE = 16
TEMPERATURE = 0.1
NUM_DEVICES = 8
RESUMED: dict[tuple[str, ...], dict] = {}

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "both", ["both", "labels", "devices"], "Which measurement to run.")
flags.DEFINE_integer("samples", 4096, "Part 1: samples N (2 views each).")
flags.DEFINE_list("classes", ["80", "1000", "8922"], "Part 1: label-space sizes C.")
flags.DEFINE_list("positives", list(POSITIVES), "Part 1: `positives` values.")
flags.DEFINE_list("old_positives", ["sd"], "Part 1: `positives` timed on old code.")
flags.DEFINE_string("old_rev", "65c59b1", "Part 1: the git revision of the old loss.")
flags.DEFINE_list(
    "global_samples", ["16384", "65536", "262144", "1048576"], "Part 2: global batch sizes."
)
flags.DEFINE_list(
    "device_counts", ["2", "4"], "Part 2: other device counts P, at the largest global batch."
)
flags.DEFINE_integer(
    "repeats", 5, "Timed rounds (one call per configuration each), after a warm-up."
)
flags.DEFINE_integer("timeout", 2400, "Seconds per child process.")
flags.DEFINE_bool("gpu", False, "Part 1 on the GPU (float32 matmuls at highest precision).")
flags.DEFINE_string("out_dir", str(RESULTS), "Where the table, JSON and figure go.")
flags.DEFINE_string(
    "resume_from", "", "A log of an interrupted run (its stdout): configurations there are reused."
)
flags.DEFINE_list("worker", [], "Internal: one configuration in this process.")


def make_labels(num_samples: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """[N, 16] distinct random class ids per sample."""
    rng = np.random.default_rng(seed)
    keys = rng.random((num_samples, num_classes))
    return np.argsort(keys, axis=1)[:, :LABELS_PER_SAMPLE].astype(np.int32)


def load_old_losses(rev: str):
    source = subprocess.run(
        ["git", "show", f"{rev}:sdjax/losses.py"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_losses.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_losses", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def label_configs(positives: str) -> list[tuple[str, str, int]]:
    """(impl, label format, C) of one `positives`, in timing order."""
    configs = []
    for num_classes in FLAGS.classes:
        formats = [("new", "multi_hot"), ("new", "indices")]
        if positives in FLAGS.old_positives:
            formats.insert(0, ("old", "multi_hot"))
        configs += [(impl, label_format, int(num_classes)) for impl, label_format in formats]
    return configs


def time_worker(positives: str) -> list[dict]:
    """Every configuration of `positives`, compiled here and timed alternately."""
    import jax
    import jax.numpy as jnp

    if FLAGS.gpu:
        jax.config.update("jax_default_matmul_precision", "highest")
    from sdjax import losses

    old = None
    num_samples = FLAGS.samples
    rng = np.random.default_rng(1)
    features = jnp.asarray(
        rng.normal(size=(num_samples, NUM_VIEWS, FEATURE_DIM)).astype(np.float32)
    )
    rows, steps = [], []
    for impl, label_format, num_classes in label_configs(positives):
        if impl == "old" and old is None:
            old = load_old_losses(FLAGS.old_rev)
        module = old if impl == "old" else losses
        ids = make_labels(num_samples, num_classes)
        if label_format == "indices":
            labels = losses.LabelIndices(jnp.asarray(ids))
        else:
            dense = np.zeros((num_samples, num_classes), np.float32)
            np.put_along_axis(dense, ids, 1.0, axis=1)
            labels = jnp.asarray(dense)
        step = jax.jit(
            jax.value_and_grad(
                lambda f, y, module=module: module.multilabel_supcon_loss(
                    f, y, positives=positives, temperature=TEMPERATURE
                )
            )
        )
        compiled = step.lower(features, labels).compile()
        memory = compiled.memory_analysis()
        start = time.perf_counter()
        loss, _ = jax.block_until_ready(compiled(features, labels))
        rows.append(
            {
                "impl": impl,
                "format": label_format,
                "positives": positives,
                "classes": num_classes,
                "loss": float(loss),
                "first_call_s": time.perf_counter() - start,
                "peak_mb": (
                    memory.argument_size_in_bytes
                    + memory.temp_size_in_bytes
                    + memory.output_size_in_bytes
                    - memory.alias_size_in_bytes
                )
                / 2**20,
                "temp_mb": memory.temp_size_in_bytes / 2**20,
                "times_s": [],
                "cpu_s": [],
            }
        )
        steps.append((compiled, labels))
    order = list(range(len(steps)))
    for round_index in range(FLAGS.repeats):
        for i in order if round_index % 2 == 0 else order[::-1]:
            compiled, labels = steps[i]
            start, cpu_start = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(features, labels))
            rows[i]["times_s"].append(time.perf_counter() - start)
            rows[i]["cpu_s"].append(time.process_time() - cpu_start)
    for row in rows:
        row["median_s"] = float(np.median(row["times_s"]))
        row["min_s"] = float(np.min(row["times_s"]))
        row["cpu_median_s"] = float(np.median(row["cpu_s"]))
    return rows


def memory_worker(exchange: str, global_samples: int, num_devices: int) -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", num_devices)
    import jax.numpy as jnp
    from jax.sharding import AxisType

    from sdjax import losses

    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,))
    loss_fn = losses.make_sharded_loss(
        mesh, positives="sd", temperature=TEMPERATURE, exchange=exchange
    )
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    shape = jax.ShapeDtypeStruct
    features = shape((global_samples, NUM_VIEWS, FEATURE_DIM), jnp.float32, sharding=sharding)
    labels = losses.LabelIndices(
        shape((global_samples, LABELS_PER_SAMPLE), jnp.int32, sharding=sharding)
    )
    mask = shape((global_samples,), jnp.bool_, sharding=sharding)
    step = jax.jit(jax.value_and_grad(loss_fn))
    start = time.perf_counter()
    memory = step.lower(features, labels, mask).compile().memory_analysis()
    per_device = (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {
        "exchange": exchange,
        "global_samples": global_samples,
        "devices": num_devices,
        "per_device_mb": per_device / 2**20,
        "temp_mb": memory.temp_size_in_bytes / 2**20,
        "argument_mb": memory.argument_size_in_bytes / 2**20,
        "compile_s": time.perf_counter() - start,
    }


def worker_of(result: dict) -> list[str]:
    """The worker arguments that produced a result row."""
    if "classes" in result:
        return ["time", result["positives"]]
    devices = str(result.get("devices", NUM_DEVICES))
    return ["devices", result["exchange"], str(result["global_samples"]), devices]


def resumed_results() -> dict[tuple[str, ...], list[dict]]:
    if not FLAGS.resume_from:
        return {}
    rows: dict[tuple[str, ...], list[dict]] = {}
    for line in Path(FLAGS.resume_from).read_text().splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            rows.setdefault(tuple(worker_of(result)), []).append(result)
    return rows


def run_child(worker: list[str]) -> list[dict]:
    """The result rows of one worker, run in a fresh process (printed as JSON lines)."""
    if tuple(worker) in RESUMED:
        return RESUMED[tuple(worker)]
    command = [
        sys.executable,
        "-m",
        "experiments.bench_loss_scaling",
        f"--worker={','.join(worker)}",
        f"--samples={FLAGS.samples}",
        f"--repeats={FLAGS.repeats}",
        f"--old_rev={FLAGS.old_rev}",
        f"--classes={','.join(FLAGS.classes)}",
        f"--old_positives={','.join(FLAGS.old_positives)}",
    ] + (["--gpu"] if FLAGS.gpu else [])
    environment = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=FLAGS.timeout,
            cwd=REPOSITORY,
            env=environment,
        )
    except subprocess.TimeoutExpired:
        return [{"worker": worker, "status": f"timeout after {FLAGS.timeout} s"}]
    if done.returncode != 0:
        return [{"worker": worker, "status": f"failed: {done.stderr.strip()[-400:]}"}]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    results = results if isinstance(results, list) else [results]
    for result in results:
        result["status"] = "ok"
        print(json.dumps(result), flush=True)
    return results


def round_ratios(row: dict, reference: dict) -> np.ndarray:
    """Per-round wall-time ratios of two configurations timed alternately in one child."""
    return np.array(row["times_s"]) / np.array(reference["times_s"])


def label_rows(results: list[dict]) -> list[str]:
    ok = [r for r in results if r.get("status") == "ok" and "classes" in r]
    lines = [
        "| positives | C | impl | labels | median wall (s) | median CPU (s) "
        "| × its C=80 (median of rounds) | compiled peak (MB) | XLA temporaries (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["impl"], r["format"], r["positives"]): r for r in ok if r["classes"] == 80}
    for r in sorted(ok, key=lambda r: (r["positives"], r["impl"], r["format"], r["classes"])):
        reference = base.get((r["impl"], r["format"], r["positives"]))
        ratio = f"{np.median(round_ratios(r, reference)):.2f}" if reference else ""
        lines.append(
            f"| {r['positives']} | {r['classes']} | {r['impl']} | {r['format']} | "
            f"{r['median_s']:.3f} | {r['cpu_median_s']:.3f} | {ratio} | {r['peak_mb']:.0f} | "
            f"{r['temp_mb']:.0f} |"
        )
    for r in results:
        if r.get("status") != "ok" and r["worker"][0] == "time":
            lines.append(f"| {r['worker'][1]} | | | | {r['status']} | | | | |")
    return lines


def label_targets(results: list[dict]) -> list[str]:
    """C = 8922 with index lists against the faster new format at C = 80 (by median wall time),
    per positives: the median of the per-round wall-time ratios, and the ratio of median CPU
    times (less sensitive to other jobs on a shared machine)."""
    ok = [r for r in results if r.get("status") == "ok" and "classes" in r]
    targets = []
    for positives in POSITIVES:
        new = [r for r in ok if r["impl"] == "new" and r["positives"] == positives]
        small = [r for r in new if r["classes"] == 80]
        large = [r for r in new if r["classes"] == 8922 and r["format"] == "indices"]
        if small and large:
            reference = min(small, key=lambda r: r["median_s"])
            ratio = float(np.median(round_ratios(large[0], reference)))
            cpu_ratio = large[0]["cpu_median_s"] / reference["cpu_median_s"]
            verdict = "PASS" if ratio <= 1.5 else "FAIL"
            targets.append(
                f"{positives}: C=8922 (index lists) / C=80 ({reference['format']}) = {ratio:.2f} "
                f"wall, {cpu_ratio:.2f} CPU (<= 1.5): {verdict}"
            )
    return targets


def local_samples(row: dict) -> float:
    """N / P: the global batch's samples per device."""
    return row["global_samples"] / row.get("devices", NUM_DEVICES)


def device_fits(results: list[dict]) -> list[str]:
    """Least-squares lines of the per-device MB, per exchange: against N / P over every row
    (every N and P), and against N at P = 8. The line in N / P fits the ring's rows and not
    all_gather's, whose per-device memory hardly falls with P."""
    lines = []
    for exchange in ("all_gather", "ring"):
        rows = [r for r in results if r.get("exchange") == exchange and r.get("status") == "ok"]
        if len(rows) < 2:
            continue
        y = np.array([r["per_device_mb"] for r in rows])
        x = np.array([local_samples(r) for r in rows]) / 2**20
        slope, intercept = np.polyfit(x, y, 1)
        worst = np.max(np.abs(intercept + slope * x - y))
        lines.append(
            f"- {exchange}: MB = {intercept:.1f} + {slope:.1f} · (N/P) / 2^20 over every row, "
            f"largest deviation {worst:.0f} MB ({100 * worst / y.max():.0f}% of the largest row)"
        )
        at_p = [r for r in rows if r.get("devices", NUM_DEVICES) == NUM_DEVICES]
        if len(at_p) >= 2:
            x = np.array([r["global_samples"] for r in at_p]) / 2**20
            slope, intercept = np.polyfit(x, [r["per_device_mb"] for r in at_p], 1)
            lines.append(
                f"- {exchange}: MB = {intercept:.1f} + {slope:.1f} · N / 2^20 at P = {NUM_DEVICES}"
            )
    return lines


def device_rows(results: list[dict]) -> list[str]:
    lines = [
        "| global samples N | devices P | exchange | per-device MB (args + temps + outputs) | "
        "temporaries MB | KB per local sample (MB / (N/P)) |",
        "|---|---|---|---|---|---|",
    ]
    ok = (r for r in results if "exchange" in r and r.get("status") == "ok")
    for r in sorted(
        ok, key=lambda r: (r["exchange"], -r.get("devices", NUM_DEVICES), r["global_samples"])
    ):
        lines.append(
            f"| {r['global_samples']} | {r.get('devices', NUM_DEVICES)} | {r['exchange']} | "
            f"{r['per_device_mb']:.1f} | {r['temp_mb']:.1f} | "
            f"{1024 * r['per_device_mb'] / local_samples(r):.1f} |"
        )
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    ok = [r for r in results if r.get("status") == "ok"]
    for impl, label_format, style in (
        ("old", "multi_hot", "s--"),
        ("new", "multi_hot", "o-"),
        ("new", "indices", "^-"),
    ):
        for positives in ("sd", "mulsupcon"):
            rows = sorted(
                (
                    r
                    for r in ok
                    if r.get("impl") == impl
                    and r.get("format") == label_format
                    and r.get("positives") == positives
                ),
                key=lambda r: r["classes"],
            )
            if rows:
                ax_time.plot(
                    [r["classes"] for r in rows],
                    [r["median_s"] for r in rows],
                    style,
                    label=f"{impl} {label_format} ({positives})",
                )
    ax_time.set(
        xscale="log",
        yscale="log",
        xlabel="label-space size C (16 labels per sample)",
        ylabel="fwd+bwd (s)",
        title=f"N = {FLAGS.samples} samples x {NUM_VIEWS} views, D = {FEATURE_DIM}",
    )
    for exchange in ("all_gather", "ring"):
        rows = sorted(
            (
                r
                for r in ok
                if r.get("exchange") == exchange and r.get("devices", NUM_DEVICES) == NUM_DEVICES
            ),
            key=lambda r: r["global_samples"],
        )
        if rows:
            ax_memory.plot(
                [r["global_samples"] for r in rows],
                [r["per_device_mb"] for r in rows],
                "o-",
                label=exchange,
            )
    ax_memory.set(
        xscale="log",
        yscale="log",
        xlabel="global batch (samples, 2 views each)",
        ylabel="per-device MB (compiled)",
        title=f"make_sharded_loss fwd+bwd, {NUM_DEVICES} devices",
    )
    for ax in (ax_time, ax_memory):
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.worker:
        kind, *args = FLAGS.worker
        if kind == "time":
            print(json.dumps(time_worker(*args)))
        else:
            exchange, global_samples, num_devices = args
            print(json.dumps(memory_worker(exchange, int(global_samples), int(num_devices))))
        return

    import jax

    RESUMED.update(resumed_results())
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    if FLAGS.part in ("both", "labels"):
        for positives in FLAGS.positives:
            results += run_child(["time", positives])
    if FLAGS.part in ("both", "devices"):
        sizes = [(n, str(NUM_DEVICES)) for n in FLAGS.global_samples]
        sizes += [(FLAGS.global_samples[-1], p) for p in FLAGS.device_counts]
        for global_samples, num_devices in sizes:
            for exchange in ("all_gather", "ring"):
                results += run_child(["devices", exchange, global_samples, num_devices])

    device = "GPU" if FLAGS.gpu else f"{cpu_model()}, {os.cpu_count()} cores"
    lines = [
        "# The loss at the paper's scale",
        "",
        f"- machine: {device} (a shared machine: other jobs ran at the same time)",
        f"- date: {datetime.date.today()}, jax {jax.__version__}",
        f"- command: `python -m experiments.bench_loss_scaling` "
        f"(old = `git show {FLAGS.old_rev}:sdjax/losses.py`)",
        "",
        f"## Label-space size: N = {FLAGS.samples} samples x {NUM_VIEWS} views, D = "
        f"{FEATURE_DIM}, {LABELS_PER_SAMPLE} labels per sample, τ = {TEMPERATURE}",
        "",
        f"One child process per `positives`: its configurations compiled, called once, then "
        f"timed alternately in {FLAGS.repeats} rounds (one call each per round). A ratio is the "
        "median over rounds of the two configurations' wall-time ratio in that round.",
        "",
        *label_rows(results),
        "",
        "Targets:",
        *[f"- {t}" for t in label_targets(results)],
        "",
        f"## Global batch over {NUM_DEVICES} devices: per-device memory (compiled)",
        "",
        f"`make_sharded_loss(positives='sd')`, fwd+bwd, {NUM_VIEWS} views, D = {FEATURE_DIM}, "
        f"LabelIndices with {LABELS_PER_SAMPLE} labels, automatic blocks.",
        "",
        *device_rows(results),
        "",
        "Least-squares lines (N global samples, P devices):",
        *device_fits(results),
        "",
    ]
    (out_dir / "bench_loss_scaling.md").write_text("\n".join(lines))
    (out_dir / "bench_loss_scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "bench_loss_scaling.png")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
