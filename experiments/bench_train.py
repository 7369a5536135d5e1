"""Benchmark: stage-1 training throughput and peak memory, sdjax against a PyTorch peer.

One training step = encode two views of every example with a ResNet (sdjax's architecture:
patchify stem, basic or bottleneck blocks, GroupNorm, mean pooling), the projection head, the
S-D loss over the global batch, and an AdamW update. sdjax runs `sdjax.models.create_model`
with `sdjax.losses.multilabel_supcon_loss` under `nnx.jit`, called through
`nnx.cached_partial` as the trainer calls it (optionally with
`sdjax.gradient_cache.chunked_value_and_grad`); the peer is the same network written in
PyTorch here, with bench_loss's dense S-D loss, under `torch.compile` (and eagerly). On a GPU
both compute in bfloat16 (sdjax's `compute_dtype`, PyTorch's autocast) with float32
parameters. The views are fixed random images: this times the model, not the augmentations.

Every (implementation, network, batch) runs in a fresh child process, so its peak memory is
its own (peak RSS on the CPU, the allocator's peak on a GPU); PyTorch's in its own interpreter
(`--torch_python`, as in bench_loss: `.venv-torch` when it exists). With `--rounds`, the whole
sequence of configurations runs again, so the implementations alternate in one sitting.
`--chunk_counts` adds XLA's buffer sizes of the gradient-cached step for each number of chunks
(compiled, not run): the memory that gradient caching must keep bounded. Writes
`experiments/results/bench_train.{json,md,png}` (`bench_train_gpu.*` with `--gpu`).

COMMAND (from the repository root):
  make bench                                   # makes .venv-torch, runs both benchmarks
  .venv/bin/python -m experiments.bench_train  # CPU: ResNet-18/50, 64 px, batch 32
  python -m experiments.bench_train --gpu      # GPU: 224 px, batch 256, MFU, largest batches
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_loss import (
    cpu_model,
    interpreter,
    peak_gpu_mb,
    peak_rss_mb,
    torch_sd_loss,
    torch_version,
    worker_json,
)
from sdjax import host_memory

ARCHS = {  # name: (stage sizes, block)
    "resnet18": ((2, 2, 2, 2), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
IMPLS = ("sdjax", "torch_compile", "torch_eager")
WIDTH, STEM_STRIDE, PROJECTION_HIDDEN, PROJECTION_DIM = 64, 4, 512, 128
NUM_VIEWS, NUM_CLASSES, LABEL_DENSITY, TEMPERATURE = 2, 80, 0.04, 0.1
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-4
# Dense bfloat16 tensor-core peaks (no sparsity), from the vendors' data sheets, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "experiments" / "results"

FLAGS = flags.FLAGS
# bench_loss (imported above) defines --gpu, --impls (the same three names), --timeout,
# --torch_python and --out_dir, which mean the same here.
flags.DEFINE_list("archs", list(ARCHS), f"Networks, from {sorted(ARCHS)}.")
flags.DEFINE_integer("image_size", 0, "Pixels per side; 0: 64, with --gpu 224.")
flags.DEFINE_integer("batch_size", 0, "Examples per step (x2 views); 0: 32, with --gpu 256.")
flags.DEFINE_integer("steps", 0, "Timed steps after 2 warm-up steps; 0: 3, with --gpu 20.")
flags.DEFINE_integer("chunk_size", 0, "sdjax gradient caching: inputs per chunk; 0: off.")
flags.DEFINE_integer("rounds", 1, "Times the sequence of configurations runs (alternating).")
flags.DEFINE_list(
    "chunk_counts", [], "Numbers of chunks whose gradient-cached step's XLA buffers to report."
)
flags.DEFINE_string(
    "chunk_memory_from",
    "",
    "A bench_train JSON whose chunk-count memory rows to reuse (compiled sizes do not depend on "
    "the machine's load) instead of compiling them again with --chunk_counts.",
)
flags.DEFINE_string("note", "", "A line for the header, e.g. what else ran on the machine.")
flags.DEFINE_bool("max_batch", None, "Search the largest batch that fits; default: with --gpu.")
flags.DEFINE_list("train_worker", [], "Internal: IMPL,ARCH,BATCH,CHUNK, one configuration.")
flags.DEFINE_list("memory_worker", [], "Internal: ARCH,BATCH,CHUNK, XLA's buffer sizes.")


def make_batch(batch_size: int, image_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    views = rng.random((batch_size, NUM_VIEWS, image_size, image_size, 3), dtype=np.float32)
    labels = rng.random((batch_size, NUM_CLASSES)) < LABEL_DENSITY
    labels[np.arange(batch_size), rng.integers(0, NUM_CLASSES, batch_size)] = True
    return views, labels.astype(np.float32)


# --------------------------------------------------------------------------------------------
# sdjax
# --------------------------------------------------------------------------------------------


def sdjax_config(arch: str, gpu: bool):
    """The benchmark's sdjax model config (`sdjax.models.create_model`'s)."""
    import ml_collections

    stage_sizes, block = ARCHS[arch]
    return ml_collections.ConfigDict(
        {
            "method": "contrastive",
            "compute_dtype": "bfloat16" if gpu else "float32",
            "model": {
                "encoder": {
                    "name": "resnet",
                    "stage_sizes": stage_sizes,
                    "block": block,
                    "width": WIDTH,
                    "in_channels": 3,
                    "stem_stride": STEM_STRIDE,
                },
                "projection_hidden_dim": PROJECTION_HIDDEN,
                "projection_dim": PROJECTION_DIM,
            },
        }
    )


def sdjax_loss_of_outputs(outputs, labels):
    """The benchmark's S-D loss of the model's outputs, views of an example adjacent."""
    from sdjax import losses

    embeddings = outputs.reshape((labels.shape[0], NUM_VIEWS, -1))
    return losses.multilabel_supcon_loss(
        embeddings, labels, positives="sd", temperature=TEMPERATURE
    )


def sdjax_train_step(arch: str, batch_size: int, image_size: int, chunk_size: int, gpu: bool):
    """`(train_step, args)`: the jitted step and its arguments (model, optimizer, views, labels)."""
    import jax
    import optax
    from flax import nnx

    from sdjax import models
    from sdjax.gradient_cache import chunked_value_and_grad

    expected = "gpu" if gpu else "cpu"
    if jax.default_backend() != expected:
        raise RuntimeError(f"jax runs on {jax.default_backend()}, expected {expected}.")
    model = models.create_model(sdjax_config(arch, gpu), NUM_CLASSES, seed=0)
    optimizer = nnx.Optimizer(
        model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), wrt=nnx.Param
    )
    views, labels = (jax.device_put(a) for a in make_batch(batch_size, image_size))

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, views, labels):
        flat = views.reshape((-1, *views.shape[2:]))
        if chunk_size:
            loss, grads = chunked_value_and_grad(
                model, flat, lambda outputs: sdjax_loss_of_outputs(outputs, labels), chunk_size
            )
        else:
            loss, grads = nnx.value_and_grad(lambda m: sdjax_loss_of_outputs(m(flat), labels))(
                model
            )
        optimizer.update(model, grads)
        return loss

    return train_step, (model, optimizer, views, labels)


def sdjax_step(arch: str, batch_size: int, image_size: int, chunk_size: int, gpu: bool):
    """`(run, flops_per_step, xla_temp_mb, compiled)`: `run()` takes one training step and
    waits for it; `xla_temp_mb` is XLA's buffer for the step's intermediates (activations and
    the like); `compiled` is the step as XLA compiled it (its HLO: `compiled.as_text()`)."""
    import jax
    from flax import nnx

    train_step, args = sdjax_train_step(arch, batch_size, image_size, chunk_size, gpu)
    compiled = train_step.lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts a loop's body once, not per iteration: no FLOP count for the chunked step.
    flops = float(cost.get("flops", 0.0)) if cost and not chunk_size else 0.0
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20

    # As sdjax.train's loop: the model's and optimizer's graph walked once, not at every call.
    model, optimizer, views, labels = args
    cached_step = nnx.cached_partial(train_step, model, optimizer)

    def run():
        return float(jax.block_until_ready(cached_step(views, labels)))

    return run, flops, temp_mb, compiled


# --------------------------------------------------------------------------------------------
# PyTorch peer
# --------------------------------------------------------------------------------------------


def torch_model(arch: str):
    """sdjax's ResNet and projection head, layer for layer, in PyTorch."""
    import torch
    from torch import nn

    def norm(channels):
        return nn.GroupNorm(min(8, channels), channels)

    def conv(cin, cout, kernel, stride=1):
        return nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)

    class Basic(nn.Module):
        expansion = 1

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.norm1 = conv(cin, cout, 3, stride), norm(cout)
            self.conv2, self.norm2 = conv(cout, cout, 3), norm(cout)
            projected = stride != 1 or cin != cout
            self.shortcut = conv(cin, cout, 1, stride) if projected else nn.Identity()

        def forward(self, x):
            y = torch.relu(self.norm1(self.conv1(x)))
            return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, cin, cout, stride):
            super().__init__()
            inner = cout // 4
            self.conv1, self.norm1 = conv(cin, inner, 1), norm(inner)
            self.conv2, self.norm2 = conv(inner, inner, 3, stride), norm(inner)
            self.conv3, self.norm3 = conv(inner, cout, 1), norm(cout)
            projected = stride != 1 or cin != cout
            self.shortcut = (
                nn.Sequential(conv(cin, cout, 1, stride), norm(cout)) if projected else None
            )

        def forward(self, x):
            y = torch.relu(self.norm1(self.conv1(x)))
            y = torch.relu(self.norm2(self.conv2(y)))
            y = self.norm3(self.conv3(y))
            return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))

    class Model(nn.Module):
        def __init__(self, stage_sizes, block):
            super().__init__()
            block = {"basic": Basic, "bottleneck": Bottleneck}[block]
            self.stem = nn.Conv2d(3, WIDTH, STEM_STRIDE, STEM_STRIDE, bias=False)
            self.stem_norm = norm(WIDTH)
            layers, channels = [], WIDTH
            for stage, num_blocks in enumerate(stage_sizes):
                out = WIDTH * 2**stage * block.expansion
                for index in range(num_blocks):
                    layers.append(block(channels, out, 2 if stage and not index else 1))
                    channels = out
            self.blocks = nn.Sequential(*layers)
            self.head = nn.Sequential(
                nn.Linear(channels, PROJECTION_HIDDEN),
                nn.ReLU(),
                nn.Linear(PROJECTION_HIDDEN, PROJECTION_DIM),
            )

        def forward(self, images):
            x = torch.relu(self.stem_norm(self.stem(images)))
            features = self.blocks(x).float().mean(dim=(2, 3))
            return torch.nn.functional.normalize(self.head(features).float(), dim=1)

    return Model(*ARCHS[arch])


def torch_step(arch: str, batch_size: int, image_size: int, compiled: bool, gpu: bool):
    import torch

    device = "cuda" if gpu else "cpu"
    # channels_last suits tensor cores; on the CPU GroupNorm's channels_last path is slower.
    layout = torch.channels_last if gpu else torch.contiguous_format
    model = torch_model(arch).to(device).to(memory_format=layout)
    optimizer = torch.optim.AdamW(model.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    views, labels = make_batch(batch_size, image_size)
    # [B, V, H, W, C] -> [B*V, C, H, W]: the views of an example adjacent, as in sdjax.
    images = torch.from_numpy(views.reshape((-1, *views.shape[2:]))).permute(0, 3, 1, 2)
    images = images.contiguous(memory_format=layout).to(device)
    # Each view is its own anchor with its example's labels: the multi-view S-D loss.
    view_labels = torch.from_numpy(np.repeat(labels, NUM_VIEWS, axis=0)).to(device)

    def loss_fn(images):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            embeddings = model(images)
        return torch_sd_loss(embeddings.float(), view_labels, TEMPERATURE)

    loss_fn = torch.compile(loss_fn) if compiled else loss_fn

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(images)
        loss.backward()
        optimizer.step()
        if gpu:
            torch.cuda.synchronize()
        return float(loss.detach())

    return run, 0.0


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def timed_calls(run, calls: int) -> tuple[list[float], object, dict[str, float]]:
    """`calls` calls of `run`: their wall times (s), the last one's result, and the process's
    minor page faults and user and system CPU seconds per call over them (the kernel's share:
    faulting in fresh memory, see sdjax.host_memory)."""
    times, result = [], None
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(calls):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = {
        "page_faults": (after.ru_minflt - before.ru_minflt) / calls,
        "user_s": (after.ru_utime - before.ru_utime) / calls,
        "system_s": (after.ru_stime - before.ru_stime) / calls,
    }
    return times, result, usage


def worker(impl, arch, batch_size, chunk_size, image_size, steps, gpu) -> dict:
    start = time.perf_counter()
    if impl == "sdjax":
        run, flops, temp_mb, _ = sdjax_step(arch, batch_size, image_size, chunk_size, gpu)
    else:
        run, flops = torch_step(arch, batch_size, image_size, impl == "torch_compile", gpu)
        temp_mb = None
    first_loss = run()  # compiles (sdjax: compiled above, for the FLOP count)
    first_call = time.perf_counter() - start
    run()
    times, last_loss, usage = timed_calls(run, steps)
    median = float(np.median(times))
    return {
        "impl": impl,
        "arch": arch,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "image_size": image_size,
        "samples_per_s": batch_size / median,
        "median_step_s": median,
        "times_s": times,
        "first_call_s": first_call,
        "losses": [first_loss, last_loss],
        "xla_flops_per_step": flops,
        "xla_temp_mb": temp_mb,
        "peak_memory_mb": peak_gpu_mb(impl) if gpu else peak_rss_mb(),
        "page_faults_per_step": usage["page_faults"],
        "system_s_per_step": usage["system_s"],
    }


def memory_worker(arch, batch_size, chunk_size, image_size, gpu) -> dict:
    """XLA's buffer sizes for sdjax's step, compiled and not run."""
    train_step, args = sdjax_train_step(arch, batch_size, image_size, chunk_size, gpu)
    memory = train_step.lower(*args).compile().memory_analysis()
    inputs = batch_size * NUM_VIEWS
    return {
        "arch": arch,
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "num_chunks": inputs // chunk_size if chunk_size else 1,
        "xla_temp_mb": memory.temp_size_in_bytes / 2**20,
        "xla_argument_mb": memory.argument_size_in_bytes / 2**20,
    }


def run_memory_worker(arch, batch_size, chunk_size, image_size, gpu, timeout) -> dict:
    command = [sys.executable, "-m", "experiments.bench_train"]
    command += [f"--memory_worker={arch},{batch_size},{chunk_size}", f"--image_size={image_size}"]
    return worker_json(command, gpu, timeout)


def run_config(impl, arch, batch_size, chunk_size, image_size, steps, gpu, timeout) -> dict:
    command = [interpreter(impl), "-m", "experiments.bench_train"]
    command += [f"--train_worker={impl},{arch},{batch_size},{chunk_size}"]
    command += [f"--image_size={image_size}", f"--steps={steps}"] + (["--gpu"] if gpu else [])
    row = {"impl": impl, "arch": arch, "batch_size": batch_size, "chunk_size": chunk_size}
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY
        )
    except subprocess.TimeoutExpired:
        return row | {"status": f"timeout after {timeout} s"}
    if done.returncode != 0:
        out_of_memory = ("MemoryError", "OutOfMemoryError", "RESOURCE_EXHAUSTED", "out of memory")
        killed = done.returncode in (-9, 137) or any(t in done.stderr for t in out_of_memory)
        return row | {"status": "OOM" if killed else f"failed: {done.stderr.strip()[-300:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"status": "ok"}


def largest_batch(impl, arch, chunk_size, image_size, start, timeout) -> int:
    """The largest power-of-two batch (x2 views) that trains without running out of memory.

    With `chunk_size`, chunks stay that size, so only the embeddings grow with the batch.
    """
    fits, batch = 0, start
    while batch <= 2**20:
        row = run_config(impl, arch, batch, chunk_size, image_size, 1, True, timeout)
        print(f"  max batch {impl} {arch} chunk {chunk_size}: {batch} {row['status']}", flush=True)
        if row["status"] != "ok":
            break
        fits, batch = batch, batch * 2
    return fits


def merge_rounds(rows: list[dict]) -> dict:
    """One configuration's rows from several rounds: steps pooled, the worst peak memory."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return rows[0]
    times = [t for r in ok for t in r["times_s"]]
    median = float(np.median(times))
    return ok[0] | {
        "times_s": times,
        "median_step_s": median,
        "round_medians_s": [r["median_step_s"] for r in ok],
        "samples_per_s": ok[0]["batch_size"] / median,
        "first_call_s": float(np.mean([r["first_call_s"] for r in ok])),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in ok),
        **{
            key: float(np.mean([r[key] for r in ok]))
            for key in ("page_faults_per_step", "system_s_per_step")
            if all(key in r for r in ok)
        },
    }


def ratio_to(results, row, impl, chunk_size=0) -> float | None:
    """`row`'s step time over `impl`'s (same network), in the same round where both ran."""
    other = next(
        (
            r
            for r in results
            if r["status"] == "ok"
            and r["arch"] == row["arch"]
            and r["impl"] == impl
            and r["chunk_size"] == chunk_size
        ),
        None,
    )
    if row["status"] != "ok" or other is None:
        return None
    return row["median_step_s"] / other["median_step_s"]


def round_ratios(results, row, impl) -> list[float]:
    """`row`'s median step over `impl`'s plain one (same network), round by round: load that
    slows one round says nothing of the ratio in another, so rounds are never pooled here."""
    other = next(
        (
            r
            for r in results
            if r["status"] == "ok"
            and r["arch"] == row["arch"]
            and r["impl"] == impl
            and not r["chunk_size"]
        ),
        None,
    )
    if other is None:
        return []
    mine = row.get("round_medians_s", [row["median_step_s"]])
    theirs = other.get("round_medians_s", [other["median_step_s"]])
    return [a / b for a, b in zip(mine, theirs, strict=False)]


def targets(results, memory_rows) -> list[str]:
    """The issue's targets, checked on this run: a ratio passes only if it passes in every
    round."""
    lines = []
    for row in results:
        if row["impl"] != "sdjax" or row["status"] != "ok":
            continue
        checks = []
        if not row["chunk_size"]:
            limit = 1.5 if row["arch"] == "resnet18" else 1.0
            checks.append(("sdjax / torch.compile step", "torch_compile", limit))
        else:
            checks.append(
                (f"gradient caching (chunk {row['chunk_size']}) / plain step", "sdjax", 1.5)
            )
        for name, impl, limit in checks:
            ratios = round_ratios(results, row, impl)
            if ratios:
                verdict = "PASS" if max(ratios) <= limit else "FAIL"
                shown = ", ".join(f"{r:.2f}" for r in ratios)
                lines.append(
                    f"{row['arch']}: {name} by round = {shown} (<= {limit} in every round): "
                    f"{verdict}"
                )
    for arch in dict.fromkeys(r["arch"] for r in memory_rows):
        rows = sorted(
            (r for r in memory_rows if r["arch"] == arch and r["chunk_size"]),
            key=lambda r: r["num_chunks"],
        )
        temps = [r["xla_temp_mb"] for r in rows]
        if len(temps) > 1:
            grows = any(b > a * 1.01 for a, b in itertools.pairwise(temps))
            lines.append(
                f"{arch}: XLA temp memory of the cached step for {rows[0]['num_chunks']}.."
                f"{rows[-1]['num_chunks']} chunks: {temps[0]:.0f}..{temps[-1]:.0f} MB, "
                f"{'grows' if grows else 'never grows'} with the number of chunks: "
                f"{'FAIL' if grows else 'PASS'}"
            )
    return lines


def write_outputs(results, max_batches, memory_rows, header, out_dir: Path, stem: str) -> None:
    lines = [*header, ""]
    lines += [
        "| network | implementation | samples/s | step (ms) | step / torch.compile's | "
        "peak memory (MB) | XLA temp (MB) | XLA GFLOP/step | achieved TFLOP/s | MFU | "
        "first call (s) | page faults / step | kernel time / step (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {label(r)} | {r['status']} | | | | | | | | | | |")
            continue
        flops = r["xla_flops_per_step"]
        tflops = f"{flops / r['median_step_s'] / 1e12:.3f}" if flops else "–"
        gflops = f"{flops / 1e9:.1f}" if flops else "–"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
        vs_compile = ratio_to(results, r, "torch_compile")
        temp = f"{r['xla_temp_mb']:.0f}" if r.get("xla_temp_mb") is not None else "–"
        faults = f"{r['page_faults_per_step']:,.0f}" if "page_faults_per_step" in r else "–"
        kernel = f"{1e3 * r['system_s_per_step']:.0f}" if "system_s_per_step" in r else "–"
        lines.append(
            f"| {r['arch']} | {label(r)} | {r['samples_per_s']:.1f} | "
            f"{1e3 * r['median_step_s']:.0f} | "
            f"{'–' if vs_compile is None else f'{vs_compile:.2f}'} | "
            f"{r['peak_memory_mb']:.0f} | {temp} | {gflops} | "
            f"{tflops} | {mfu} | {r['first_call_s']:.1f} | {faults} | {kernel} |"
        )
    rounds = [r for r in results if len(r.get("round_medians_s", [])) > 1]
    if rounds:
        lines += ["", "Median step (ms) in each round:", ""]
        lines += [
            f"- {r['arch']} {label(r)}: "
            + ", ".join(f"{1e3 * t:.0f}" for t in r["round_medians_s"])
            for r in rounds
        ]
    if memory_rows:
        lines += [
            "",
            "XLA's buffers for sdjax's step by number of chunks (compiled, not run; temp: "
            "activations and other intermediates; 1 chunk: the plain step):",
            "",
            "| network | chunks | inputs per chunk | XLA temp (MB) | arguments (MB) |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['arch']} | {r['num_chunks']} | {r['chunk_size'] or r['batch_size'] * 2} | "
            f"{r['xla_temp_mb']:.0f} | {r['xla_argument_mb']:.0f} |"
            for r in memory_rows
        ]
    if max_batches:
        lines += ["", "Largest batch that fits (examples, x2 views; powers of two):", ""]
        lines += ["| network | implementation | largest batch |", "|---|---|---:|"]
        lines += [f"| {arch} | {impl} | {fits} |" for (arch, impl), fits in max_batches.items()]
    lines += ["", "Targets:", "", *[f"- {t}" for t in targets(results, memory_rows)]]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(
        json.dumps(
            {
                "header": header,
                "results": results,
                "chunk_memory": memory_rows,
                "max_batch": [
                    {"arch": a, "impl": i, "batch_size": b} for (a, i), b in max_batches.items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    plot(results, memory_rows, out_dir / f"{stem}.png", header[0].lstrip("# "))


def plot(results, memory_rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    archs = list(dict.fromkeys(r["arch"] for r in ok))
    impls = list(dict.fromkeys(label(r) for r in ok))
    fig, axes = plt.subplots(1, 3 if memory_rows else 2, figsize=(16 if memory_rows else 11, 4))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        for ax, key in zip(axes, ("samples_per_s", "peak_memory_mb"), strict=False):
            values = [
                next((r[key] for r in ok if r["arch"] == a and label(r) == impl), 0) for a in archs
            ]
            ax.bar(np.arange(len(archs)) + k * width, values, width, label=impl)
    for ax, name in zip(axes, ("samples / s (higher is better)", "peak memory, MB"), strict=False):
        ax.set_xticks(np.arange(len(archs)) + width * (len(impls) - 1) / 2, archs)
        ax.set_ylabel(name)
    axes[0].legend(fontsize=8)
    if memory_rows:
        for arch in dict.fromkeys(r["arch"] for r in memory_rows):
            rows = [r for r in memory_rows if r["arch"] == arch]
            axes[2].plot(
                [r["num_chunks"] for r in rows], [r["xla_temp_mb"] for r in rows], "o-", label=arch
            )
        axes[2].set(xscale="log", xlabel="chunks (1: plain step)", ylabel="XLA temp memory, MB")
        axes[2].set_xticks([1, 2, 4, 8, 16, 32, 64], ["1", "2", "4", "8", "16", "32", "64"])
        axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def label(row) -> str:
    if row["impl"] == "sdjax" and row.get("chunk_size"):
        return f"sdjax (chunk {row['chunk_size']})"
    return row["impl"]


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def main(argv):
    del argv
    gpu = FLAGS.gpu
    image_size = FLAGS.image_size or (224 if gpu else 64)
    steps = FLAGS.steps or (20 if gpu else 3)
    if FLAGS.train_worker:
        impl, arch, batch, chunk = FLAGS.train_worker
        result = worker(impl, arch, int(batch), int(chunk), image_size, steps, gpu)
        print(json.dumps(result))
        return
    if FLAGS.memory_worker:
        arch, batch, chunk = FLAGS.memory_worker
        print(json.dumps(memory_worker(arch, int(batch), int(chunk), image_size, gpu)))
        return
    impls = [impl for impl in IMPLS if impl in FLAGS.impls]  # sdjax first
    for name, values, allowed in (("archs", FLAGS.archs, ARCHS), ("impls", FLAGS.impls, IMPLS)):
        if set(values) - set(allowed):
            raise app.UsageError(f"--{name}: got {values}, expected names from {sorted(allowed)}")
    batch_size = FLAGS.batch_size or (256 if gpu else 32)
    chunk_size = FLAGS.chunk_size
    import jax

    load_before, started = load_line(), datetime.datetime.now(datetime.UTC)
    torch_version_name = torch_version()
    has_torch = torch_version_name is not None  # without it, the PyTorch rows say so
    if gpu:
        device = f"{jax.devices()[0].device_kind} (GPU)"
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
        memory = "peak GPU memory: the framework allocator's peak in the process"
    else:
        device, peak = f"{cpu_model()}, {os.cpu_count()} cores (CPU)", None
        memory = "peak RSS: the process's VmHWM"
    configs = [
        (arch, impl, chunk)
        for arch in FLAGS.archs
        for impl in impls
        for chunk in ([0, chunk_size] if impl == "sdjax" and chunk_size else [0])
    ]
    by_config = {config: [] for config in configs}
    for round_index in range(FLAGS.rounds):
        for arch, impl, chunk in configs:
            if impl != "sdjax" and not has_torch:
                row = {"impl": impl, "arch": arch, "batch_size": batch_size, "chunk_size": 0}
                row["status"] = "skipped (torch not installed)"
            else:
                row = run_config(
                    impl, arch, batch_size, chunk, image_size, steps, gpu, FLAGS.timeout
                )
            shown = {k: v for k, v in row.items() if k != "times_s"}
            print(json.dumps({"round": round_index} | shown), flush=True)
            by_config[(arch, impl, chunk)].append(row)
    results = [merge_rounds(rows) for rows in by_config.values()]
    for row in results:
        if row["status"] == "ok" and peak and row["xla_flops_per_step"]:
            row["mfu"] = row["xla_flops_per_step"] / row["median_step_s"] / (peak * 1e12)
    if FLAGS.chunk_memory_from:
        memory_rows = json.loads(Path(FLAGS.chunk_memory_from).read_text())["chunk_memory"]
    else:
        memory_rows = [
            run_memory_worker(arch, batch_size, chunk, image_size, gpu, FLAGS.timeout)
            for arch in FLAGS.archs
            for chunk in [0] + [batch_size * NUM_VIEWS // int(n) for n in FLAGS.chunk_counts]
        ]
    max_batches = {}
    if FLAGS.max_batch if FLAGS.max_batch is not None else gpu:
        if not gpu:
            raise app.UsageError("--max_batch: the largest-batch search runs with --gpu only.")
        for arch in FLAGS.archs:
            for impl, chunk in (("sdjax", 0), ("sdjax", chunk_size or 64), ("torch_compile", 0)):
                if impl in FLAGS.impls and (impl == "sdjax" or has_torch):
                    name = f"{impl} (chunk {chunk})" if chunk else impl
                    max_batches[(arch, name)] = largest_batch(
                        impl, arch, chunk, image_size, batch_size, FLAGS.timeout
                    )
    precision = "bfloat16 compute, float32 parameters" if gpu else "float32"
    python = Path(sys.executable).name
    header = [
        f"# Stage-1 training step: sdjax vs PyTorch ({device})",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC, jax {jax.__version__} (Python "
        f"{sys.version.split()[0]}), torch {torch_version_name or 'not installed'}",
        f"- load average (1, 5, 15 min, as `uptime` gives it): {load_before} at the start, "
        f"{load_line()} at the end",
        f"- {image_size}x{image_size}x3 images, batch {batch_size} x {NUM_VIEWS} views, width "
        f"{WIDTH}, patchify stem {STEM_STRIDE}, GroupNorm, projection {PROJECTION_HIDDEN}->"
        f"{PROJECTION_DIM}, S-D loss (τ={TEMPERATURE}), AdamW; {precision}",
        f"- median of {steps} steps x {FLAGS.rounds} round(s) after a compile step and a "
        "warm-up step; the configurations run one after another in each round; each "
        f"configuration in its own process ({memory}); XLA temp: XLA's buffer for the step's "
        "intermediates; FLOPs from XLA's cost analysis of sdjax's step (the PyTorch step does "
        "the same work); page faults and kernel time: the process's minor faults and system "
        "CPU time over the timed steps, per step",
        f"- host memory: `GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}`, transparent "
        f"huge pages `{host_memory.transparent_huge_page_mode()}`, for every implementation's "
        "process (`sdjax.host_memory`)",
        f"- command: `{' '.join([python, '-m', 'experiments.bench_train', *sys.argv[1:]])}`",
        *([f"- {FLAGS.note}"] if FLAGS.note else []),
    ]
    if not gpu:
        header += [
            "- a CPU run: no MFU (no peak to divide by) and no largest-batch search, which "
            "runs with `--gpu` only; the GPU rows come from `python -m experiments.bench_train "
            "--gpu --chunk_size=64 --impls=sdjax,torch_compile,torch_eager` on a GPU machine "
            "(written to `bench_train_gpu.md`), and none was available when this was made",
        ]
    stem = "bench_train_gpu" if gpu else "bench_train"
    write_outputs(results, max_batches, memory_rows, header, Path(FLAGS.out_dir), stem)
    print((Path(FLAGS.out_dir) / f"{stem}.md").read_text())


if __name__ == "__main__":
    # Before anything else; the workers inherit the setting, PyTorch's too.
    host_memory.restart_with_huge_pages()
    app.run(main)
