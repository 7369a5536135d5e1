"""Benchmark: stage-1 training throughput and peak memory, sdjax against a PyTorch peer.

One training step = encode two views of every example with a ResNet (sdjax's architecture:
patchify stem, basic or bottleneck blocks, GroupNorm, mean pooling), the projection head, the
S-D loss over the global batch, and an AdamW update. sdjax runs `sdjax.models.create_model`
with `sdjax.losses.multilabel_supcon_loss` under `nnx.jit` (optionally with
`sdjax.gradient_cache.chunked_value_and_grad`); the peer is the same network written in
PyTorch here, with bench_loss's dense S-D loss, under `torch.compile` (and eagerly). On a GPU
both compute in bfloat16 (sdjax's `compute_dtype`, PyTorch's autocast) with float32
parameters. The views are fixed random images: this times the model, not the augmentations.

Every (implementation, network, batch) runs in a fresh child process, so its peak memory is
its own (peak RSS on the CPU, the allocator's peak on a GPU). Writes
`experiments/results/bench_train.{json,md,png}` (`bench_train_gpu.*` with `--gpu`).

COMMAND (from the repository root):
  make bench                                   # installs torch==2.13.0, runs both benchmarks
  .venv/bin/python -m experiments.bench_train  # CPU: ResNet-18/50, 64 px, batch 32
  python -m experiments.bench_train --gpu      # GPU: 224 px, batch 256, MFU, largest batches
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_loss import cpu_model, peak_gpu_mb, peak_rss_mb, torch_sd_loss

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
# bench_loss (imported above) defines --gpu, --impls (the same three names), --timeout and
# --out_dir, which mean the same here.
flags.DEFINE_list("archs", list(ARCHS), f"Networks, from {sorted(ARCHS)}.")
flags.DEFINE_integer("image_size", 0, "Pixels per side; 0: 64, with --gpu 224.")
flags.DEFINE_integer("batch_size", 0, "Examples per step (x2 views); 0: 32, with --gpu 256.")
flags.DEFINE_integer("steps", 0, "Timed steps after 2 warm-up steps; 0: 3, with --gpu 20.")
flags.DEFINE_integer("chunk_size", 0, "sdjax gradient caching: inputs per chunk; 0: off.")
flags.DEFINE_bool("max_batch", None, "Search the largest batch that fits; default: with --gpu.")
flags.DEFINE_list("train_worker", [], "Internal: IMPL,ARCH,BATCH,CHUNK, one configuration.")


def make_batch(batch_size: int, image_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    views = rng.random((batch_size, NUM_VIEWS, image_size, image_size, 3), dtype=np.float32)
    labels = rng.random((batch_size, NUM_CLASSES)) < LABEL_DENSITY
    labels[np.arange(batch_size), rng.integers(0, NUM_CLASSES, batch_size)] = True
    return views, labels.astype(np.float32)


# --------------------------------------------------------------------------------------------
# sdjax
# --------------------------------------------------------------------------------------------


def sdjax_train_step(arch: str, batch_size: int, image_size: int, chunk_size: int, gpu: bool):
    """`(train_step, args)`: the jitted step and its arguments (model, optimizer, views, labels)."""
    import jax
    import ml_collections
    import optax
    from flax import nnx

    from sdjax import losses, models
    from sdjax.gradient_cache import chunked_value_and_grad

    expected = "gpu" if gpu else "cpu"
    if jax.default_backend() != expected:
        raise RuntimeError(f"jax runs on {jax.default_backend()}, expected {expected}.")
    stage_sizes, block = ARCHS[arch]
    config = ml_collections.ConfigDict(
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
    model = models.create_model(config, NUM_CLASSES, seed=0)
    optimizer = nnx.Optimizer(
        model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), wrt=nnx.Param
    )
    views, labels = (jax.device_put(a) for a in make_batch(batch_size, image_size))

    def loss_of_outputs(outputs, labels):
        embeddings = outputs.reshape((labels.shape[0], NUM_VIEWS, -1))
        return losses.multilabel_supcon_loss(
            embeddings, labels, positives="sd", temperature=TEMPERATURE
        )

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, views, labels):
        flat = views.reshape((-1, *views.shape[2:]))
        if chunk_size:
            loss, grads = chunked_value_and_grad(
                model, flat, lambda outputs: loss_of_outputs(outputs, labels), chunk_size
            )
        else:
            loss, grads = nnx.value_and_grad(lambda m: loss_of_outputs(m(flat), labels))(model)
        optimizer.update(model, grads)
        return loss

    return train_step, (model, optimizer, views, labels)


def sdjax_step(arch: str, batch_size: int, image_size: int, chunk_size: int, gpu: bool):
    """`(run, flops_per_step)`: `run()` takes one training step and waits for it."""
    import jax

    train_step, args = sdjax_train_step(arch, batch_size, image_size, chunk_size, gpu)
    cost = train_step.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts a loop's body once, not per iteration: no FLOP count for the chunked step.
    flops = float(cost.get("flops", 0.0)) if cost and not chunk_size else 0.0

    def run():
        return float(jax.block_until_ready(train_step(*args)))

    return run, flops


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


def worker(impl, arch, batch_size, chunk_size, image_size, steps, gpu) -> dict:
    start = time.perf_counter()
    if impl == "sdjax":
        run, flops = sdjax_step(arch, batch_size, image_size, chunk_size, gpu)
    else:
        run, flops = torch_step(arch, batch_size, image_size, impl == "torch_compile", gpu)
    first_loss = run()  # compiles (sdjax: compiled above, for the FLOP count)
    first_call = time.perf_counter() - start
    run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        last_loss = run()
        times.append(time.perf_counter() - start)
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
        "peak_memory_mb": peak_gpu_mb(impl) if gpu else peak_rss_mb(),
    }


def run_config(impl, arch, batch_size, chunk_size, image_size, steps, gpu, timeout) -> dict:
    command = [sys.executable, "-m", "experiments.bench_train"]
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


def write_outputs(results, max_batches, header, out_dir: Path, stem: str) -> None:
    lines = [*header, ""]
    lines += [
        "| network | implementation | samples/s | step (ms) | peak memory (MB) | "
        "XLA GFLOP/step | achieved TFLOP/s | MFU | first call (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['arch']} | {r['impl']} | {r['status']} | | | | | | |")
            continue
        flops = r["xla_flops_per_step"]
        tflops = f"{flops / r['median_step_s'] / 1e12:.3f}" if flops else "–"
        gflops = f"{flops / 1e9:.1f}" if flops else "–"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "–"
        lines.append(
            f"| {r['arch']} | {label(r)} | {r['samples_per_s']:.1f} | "
            f"{1e3 * r['median_step_s']:.0f} | {r['peak_memory_mb']:.0f} | {gflops} | "
            f"{tflops} | {mfu} | {r['first_call_s']:.1f} |"
        )
    if max_batches:
        lines += ["", "Largest batch that fits (examples, x2 views; powers of two):", ""]
        lines += ["| network | implementation | largest batch |", "|---|---|---:|"]
        lines += [f"| {arch} | {impl} | {fits} |" for (arch, impl), fits in max_batches.items()]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(
        json.dumps(
            {
                "header": header,
                "results": results,
                "max_batch": [
                    {"arch": a, "impl": i, "batch_size": b} for (a, i), b in max_batches.items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    plot(results, out_dir / f"{stem}.png", header[0].lstrip("# "))


def plot(results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    archs = sorted({r["arch"] for r in ok})
    impls = list(dict.fromkeys(label(r) for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        for ax, key in zip(axes, ("samples_per_s", "peak_memory_mb"), strict=True):
            values = [
                next((r[key] for r in ok if r["arch"] == a and label(r) == impl), 0) for a in archs
            ]
            ax.bar(np.arange(len(archs)) + k * width, values, width, label=impl)
    for ax, name in zip(axes, ("samples / s (higher is better)", "peak memory, MB"), strict=True):
        ax.set_xticks(np.arange(len(archs)) + width * (len(impls) - 1) / 2, archs)
        ax.set_ylabel(name)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def label(row) -> str:
    if row["impl"] == "sdjax" and row.get("chunk_size"):
        return f"sdjax (chunk {row['chunk_size']})"
    return row["impl"]


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
    impls = [impl for impl in IMPLS if impl in FLAGS.impls]  # sdjax first
    for name, values, allowed in (("archs", FLAGS.archs, ARCHS), ("impls", FLAGS.impls, IMPLS)):
        if set(values) - set(allowed):
            raise app.UsageError(f"--{name}: got {values}, expected names from {sorted(allowed)}")
    batch_size = FLAGS.batch_size or (256 if gpu else 32)
    chunk_size = FLAGS.chunk_size
    import jax

    torch_version = __import__("torch").__version__
    if gpu:
        device = f"{jax.devices()[0].device_kind} (GPU)"
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
        memory = "peak GPU memory: the framework allocator's peak in the process"
    else:
        device, peak = f"{cpu_model()}, {os.cpu_count()} cores (CPU)", None
        memory = "peak RSS: the process's VmHWM"
    results = []
    for arch in FLAGS.archs:
        for impl in impls:
            chunks = [0, chunk_size] if impl == "sdjax" and chunk_size else [0]
            for chunk in chunks:
                row = run_config(
                    impl, arch, batch_size, chunk, image_size, steps, gpu, FLAGS.timeout
                )
                if row["status"] == "ok" and peak and row["xla_flops_per_step"]:
                    achieved = row["xla_flops_per_step"] / row["median_step_s"]
                    row["mfu"] = achieved / (peak * 1e12)
                print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
                results.append(row)
    max_batches = {}
    if FLAGS.max_batch if FLAGS.max_batch is not None else gpu:
        if not gpu:
            raise app.UsageError("--max_batch: the largest-batch search runs with --gpu only.")
        for arch in FLAGS.archs:
            for impl, chunk in (("sdjax", 0), ("sdjax", chunk_size or 64), ("torch_compile", 0)):
                if impl in FLAGS.impls:
                    name = f"{impl} (chunk {chunk})" if chunk else impl
                    max_batches[(arch, name)] = largest_batch(
                        impl, arch, chunk, image_size, batch_size, FLAGS.timeout
                    )
    precision = "bfloat16 compute, float32 parameters" if gpu else "float32"
    python = Path(sys.executable).name
    header = [
        f"# Stage-1 training step: sdjax vs PyTorch ({device})",
        "",
        f"- date: {datetime.date.today()}, jax {jax.__version__}, torch {torch_version}",
        f"- {image_size}x{image_size}x3 images, batch {batch_size} x {NUM_VIEWS} views, width "
        f"{WIDTH}, patchify stem {STEM_STRIDE}, GroupNorm, projection {PROJECTION_HIDDEN}->"
        f"{PROJECTION_DIM}, S-D loss (τ={TEMPERATURE}), AdamW; {precision}",
        f"- median of {steps} steps after a compile step and a warm-up step; each configuration "
        f"in its own process ({memory}); FLOPs from XLA's cost analysis of sdjax's step "
        "(the PyTorch step does the same work)",
        f"- command: `{' '.join([python, '-m', 'experiments.bench_train', *sys.argv[1:]])}`",
    ]
    if not gpu:
        header += [
            "- a CPU run: no MFU (no peak to divide by) and no largest-batch search, which "
            "runs with `--gpu` only; the GPU rows come from `python -m experiments.bench_train "
            "--gpu --chunk_size=64 --impls=sdjax,torch_compile,torch_eager` on a GPU machine "
            "(written to `bench_train_gpu.md`), and none was available when this was made",
        ]
    stem = "bench_train_gpu" if gpu else "bench_train"
    write_outputs(results, max_batches, header, Path(FLAGS.out_dir), stem)
    print((Path(FLAGS.out_dir) / f"{stem}.md").read_text())


if __name__ == "__main__":
    app.run(main)
