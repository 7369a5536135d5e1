"""Benchmark: the S-D loss's forward+backward in sdjax against dense PyTorch, eager and compiled.

Every (implementation, N) runs in a fresh child process, so its peak memory is its own: the
process's peak RSS on the CPU, the framework allocator's peak on the GPU. Inputs are placed on
the device before the timed calls, and outputs stay there. Writes
`experiments/results/bench_loss.md` and `bench_loss.png` (`bench_loss_gpu.*` with `--gpu`).

PyTorch runs in its own interpreter (`--torch_python`): the pinned torch wheel exists for
Python 3.11 only, sdjax needs 3.12. `make bench` makes `.venv-torch` (Python 3.11 with torch,
numpy and absl-py, all a PyTorch worker imports), which is the default when it exists.

COMMAND (from the repository root):
  make bench                         # makes .venv-torch (torch==2.13.0), then runs this
  .venv/bin/python -m experiments.bench_loss [--sizes=1024,4096] [--impls=sdjax,torch_eager]
  python -m experiments.bench_loss --gpu   # both frameworks on the GPU, float32 matmuls
  python -m experiments.bench_loss --gpu --precision=bfloat16   # or =default (TF32 matmuls)
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

from experiments.suite import cpu_model

FEATURE_DIM = 128
NUM_CLASSES = 80
LABEL_DENSITY = 0.04
TEMPERATURE = 0.07
IMPLS = ("sdjax", "torch_eager", "torch_compile")
REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "experiments" / "results"
TORCH_VENV_PYTHON = REPOSITORY / ".venv-torch" / "bin" / "python"
CPU_SIZES = (1024, 4096, 16384, 65536)
GPU_SIZES = (1024, 4096, 16384, 32768, 65536, 262144)
PRECISIONS = {  # --precision: what both frameworks compute in
    "highest": "float32 inputs; float32 matmuls in float32 in both frameworks (JAX precision "
    "'highest', no TF32)",
    "default": "float32 inputs; each framework's fast float32 matmuls (JAX's default precision, "
    "PyTorch's 'high': TF32 on a GPU)",
    "bfloat16": "bfloat16 inputs in both frameworks",
}

FLAGS = flags.FLAGS
flags.DEFINE_bool("gpu", False, "Run both frameworks on the GPU.")
flags.DEFINE_enum("precision", "highest", list(PRECISIONS), "What the timed calls compute in.")
flags.DEFINE_list("sizes", [], f"Numbers of views N; default {CPU_SIZES}, with --gpu {GPU_SIZES}.")
flags.DEFINE_list("impls", list(IMPLS), f"Implementations to time, from {IMPLS}.")
flags.DEFINE_integer("block_size", 0, "sdjax's block_size (0: automatic).")
flags.DEFINE_integer("repeats", 0, "Timed calls per configuration; 0: 3, with --gpu 10.")
flags.DEFINE_integer("timeout", 900, "Seconds per configuration.")
flags.DEFINE_float(
    "memory_limit_gb", 0.0, "Skip dense PyTorch runs estimated above this; 0: 20, or the GPU's."
)
flags.DEFINE_string("out_dir", str(RESULTS), "Where the table, JSON and figure go.")
flags.DEFINE_string("device_label", "", "The machine's name in the table; '': the CPU's or GPU's.")
flags.DEFINE_bool("quick", False, "Sizes 1024 and 4096 only.")
flags.DEFINE_integer("matmul_size", 0, "Side of the matmul-rate check; 0: 4096, with --gpu 16384.")
flags.DEFINE_string(
    "torch_python",
    "",
    "The interpreter of the PyTorch workers; '': .venv-torch/bin/python (made by `make bench`) "
    "if it exists, else this one.",
)
flags.DEFINE_list("worker", [], "Internal: IMPL,N,REPEATS, one configuration in this process.")
flags.DEFINE_bool("agreement_worker", False, "Internal: PyTorch's loss and gradient, as JSON.")


def make_inputs(num_views: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_views, FEATURE_DIM)).astype(np.float32)
    labels = rng.random((num_views, NUM_CLASSES)) < LABEL_DENSITY
    labels[np.arange(num_views), rng.integers(0, NUM_CLASSES, num_views)] = True  # >= 1 label
    return features, labels.astype(np.float32)


def dense_flops(num_views: int) -> float:
    """Matmul FLOPs of a dense fwd+bwd: logits, two gradient products, label intersections."""
    return 2.0 * num_views**2 * (3 * FEATURE_DIM + NUM_CLASSES)


# --------------------------------------------------------------------------------------------
# Implementations. Each returns (to_device, run): `to_device` places numpy features on the
# device, and `run` computes (loss, dloss/dfeatures) there and waits for the result.
# --------------------------------------------------------------------------------------------


def use_gpu_float32(gpu: bool, precision: str = "highest") -> None:
    """On the GPU, both frameworks multiply float32 in float32 (no TF32), so they do the same
    arithmetic; PyTorch's default already does, JAX's may use TF32. Other precisions keep
    JAX's default."""
    if gpu and precision == "highest":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")


def sdjax_value_and_grad(
    labels: np.ndarray, gpu: bool = False, block_size: int | None = None, precision="highest"
):
    import jax

    from sdjax.losses import similarity_dissimilarity_loss

    use_gpu_float32(gpu, precision)
    expected = "gpu" if gpu else "cpu"
    if jax.default_backend() != expected:
        raise RuntimeError(f"jax runs on {jax.default_backend()}, expected {expected}.")
    labels = jax.numpy.asarray(labels)
    step = jax.jit(
        jax.value_and_grad(
            lambda f: similarity_dissimilarity_loss(
                f, labels, temperature=TEMPERATURE, block_size=block_size
            )
        )
    )
    dtype = jax.numpy.bfloat16 if precision == "bfloat16" else jax.numpy.float32
    return (
        lambda features: jax.numpy.asarray(features, dtype),
        lambda features: jax.block_until_ready(step(features)),
    )


def torch_sd_loss(features, labels, temperature=TEMPERATURE):
    """docs/SPEC.md's S-D loss, one view per sample, dense N x N: the usual PyTorch formulation."""
    import torch

    z = torch.nn.functional.normalize(features, dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = torch.log_softmax(logits.masked_fill(self_mask, float("-inf")), dim=1)
    shared = labels @ labels.T
    sizes = labels.sum(dim=1)
    similarity = shared / sizes.clamp(min=1e-30)[:, None]
    dissimilarity = 1.0 / (1.0 + sizes[None, :] - shared)
    positive = (shared > 0) & ~self_mask
    weights = torch.where(positive, similarity * dissimilarity, 0.0)
    num_positives = positive.sum(dim=1)
    per_anchor = -(weights * log_prob.masked_fill(~positive, 0.0)).sum(dim=1)
    per_anchor = per_anchor / num_positives.clamp(min=1)
    has_positive = (num_positives > 0).float()
    return (per_anchor * has_positive).sum() / has_positive.sum().clamp(min=1)


def torch_value_and_grad(
    labels: np.ndarray, compiled: bool, gpu: bool = False, precision: str = "highest"
):
    import torch

    device = "cuda" if gpu else "cpu"
    if precision == "default":
        torch.set_float32_matmul_precision("high")  # TF32, as JAX's default precision
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    labels = torch.from_numpy(labels).to(device)
    loss_fn = torch.compile(torch_sd_loss) if compiled else torch_sd_loss

    def run(features):
        x = features.detach().requires_grad_(True)  # a fresh leaf: a fresh gradient
        loss = loss_fn(x, labels)
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        return loss.detach(), x.grad

    return lambda features: torch.from_numpy(features).to(device, dtype), run


def make_impl(name: str, labels: np.ndarray, gpu: bool, block_size: int | None, precision: str):
    if name == "sdjax":
        return sdjax_value_and_grad(labels, gpu, block_size, precision)
    return torch_value_and_grad(labels, name == "torch_compile", gpu, precision)


def interpreter(impl: str) -> str:
    """The Python that runs `impl`'s worker: PyTorch's from `--torch_python`, sdjax's this one."""
    if not impl.startswith("torch"):
        return sys.executable
    if FLAGS.torch_python:
        return FLAGS.torch_python
    return str(TORCH_VENV_PYTHON) if TORCH_VENV_PYTHON.exists() else sys.executable


def torch_version() -> str | None:
    """torch's version and its Python's, e.g. "2.13.0+cpu (Python 3.11)", in the PyTorch
    workers' interpreter; None when it has no torch."""
    probe = "import sys, torch; print(f'{torch.__version__} (Python {sys.version.split()[0]})')"
    done = subprocess.run([interpreter("torch"), "-c", probe], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# Worker: one configuration in its own process
# --------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec, unlike ru_maxrss,
    which a child inherits from the parent it was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb(impl: str) -> float:
    """The peak of the framework's GPU allocator in this process."""
    if impl == "sdjax":
        import jax

        return jax.local_devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def worker(
    impl: str, num_views: int, repeats: int, gpu: bool, block_size: int | None, precision: str
) -> dict:
    features, labels = make_inputs(num_views)
    to_device, run = make_impl(impl, labels, gpu, block_size, precision)
    features = to_device(features)
    start = time.perf_counter()
    run(features)  # compiles
    first_call = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(features)
        times.append(time.perf_counter() - start)
    return {
        "impl": impl,
        "n": num_views,
        "median_s": float(np.median(times)),
        "times_s": times,
        "first_call_s": first_call,
        "peak_memory_mb": peak_gpu_mb(impl) if gpu else peak_rss_mb(),
    }


AGREEMENT_VIEWS = 256


def torch_agreement_result(gpu: bool) -> dict:
    """PyTorch's eager loss and gradient on the agreement check's inputs (in its worker)."""
    features, labels = make_inputs(AGREEMENT_VIEWS, seed=1)
    to_device, run = torch_value_and_grad(labels, compiled=False, gpu=gpu)
    loss, grad = run(to_device(features))
    return {"loss": float(loss), "grad": grad.cpu().numpy().tolist()}


def worker_json(command: list[str], gpu: bool, timeout: float | None = None) -> dict:
    """A worker process's last line of output, as JSON (an error with its stderr's tail)."""
    done = subprocess.run(
        command + (["--gpu"] if gpu else []),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPOSITORY,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_agreement(gpu: bool) -> float:
    """sdjax and the PyTorch reference agree in value and gradient before anything is timed."""
    features, labels = make_inputs(AGREEMENT_VIEWS, seed=1)
    to_device, run = sdjax_value_and_grad(labels, gpu)
    loss, grad = run(to_device(features))
    command = [interpreter("torch"), "-m", "experiments.bench_loss", "--agreement_worker"]
    torch_result = worker_json(command, gpu)
    torch_loss, torch_grad = torch_result["loss"], np.asarray(torch_result["grad"])
    np.testing.assert_allclose(float(loss), torch_loss, rtol=1e-4)
    np.testing.assert_allclose(grad, torch_grad, rtol=1e-3, atol=1e-6)
    return loss


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def matmul_gflops(gpu: bool, size: int) -> float:
    import jax
    import jax.numpy as jnp

    use_gpu_float32(gpu)
    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(10 if gpu else 3):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def estimated_dense_gb(num_views: int) -> float:
    # About a dozen live N x N float32 matrices in a dense fwd+bwd.
    return 12 * num_views**2 * 4 / 1e9


def run_config(impl, num_views, repeats, timeout, gpu, block_size, precision) -> dict:
    command = [
        interpreter(impl),
        "-m",
        "experiments.bench_loss",
        f"--worker={impl},{num_views},{repeats}",
        f"--precision={precision}",
    ]
    command += ["--gpu"] if gpu else []
    command += [f"--block_size={block_size}"] if block_size else []
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY
        )
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": num_views, "status": f"timeout after {timeout} s"}
    if done.returncode != 0:
        out_of_memory = ("MemoryError", "OutOfMemoryError", "RESOURCE_EXHAUSTED")
        killed = done.returncode in (-9, 137) or any(t in done.stderr for t in out_of_memory)
        status = "OOM (killed)" if killed else f"failed: {done.stderr.strip()[-300:]}"
        return {"impl": impl, "n": num_views, "status": status}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    result["gflops"] = dense_flops(num_views) / result["median_s"] / 1e9
    return result


def write_table(results, header, targets, path, memory_name):
    by_key = {(r["impl"], r["n"]): r for r in results}
    lines = [
        *header,
        "",
        f"| N | impl | median fwd+bwd (s) | {memory_name} (MB) | GFLOP/s | sdjax / this |",
    ]
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['n']} | {r['impl']} | {r['status']} | | | |")
            continue
        ours = by_key.get(("sdjax", r["n"]), {})
        ratio = (
            f"{ours['median_s'] / r['median_s']:.2f}"
            if ours.get("status") == "ok" and r["impl"] != "sdjax"
            else ""
        )
        lines.append(
            f"| {r['n']} | {r['impl']} | {r['median_s']:.4f} | {r['peak_memory_mb']:.0f} | "
            f"{r['gflops']:.1f} | {ratio} |"
        )
    lines += ["", "Targets:", *[f"- {t}" for t in targets], ""]
    path.write_text("\n".join(lines))


def check_targets(results, memory_name) -> list[str]:
    ok = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    targets = []
    ours, compiled = ok.get(("sdjax", 16384)), ok.get(("torch_compile", 16384))
    if ours and compiled:
        ratio = ours["median_s"] / compiled["median_s"]
        verdict = "PASS" if ratio <= 0.75 else "FAIL"
        targets.append(f"N=16384: sdjax / torch.compile time = {ratio:.2f} (<= 0.75): {verdict}")
    for n, limit in ((16384, 1024), (65536, 2048)):
        if ("sdjax", n) in ok:
            peak = ok[("sdjax", n)]["peak_memory_mb"]
            verdict = "PASS" if peak <= limit else "FAIL"
            targets.append(f"N={n}: sdjax {memory_name} {peak:.0f} MB (<= {limit} MB): {verdict}")
    sizes = sorted(n for impl, n in ok if impl == "sdjax")
    for small, large in itertools.pairwise(sizes):
        growth = ok[("sdjax", large)]["median_s"] / ok[("sdjax", small)]["median_s"]
        bound = (large / small) ** 2
        verdict = "PASS" if growth <= bound * 1.1 else "FAIL"
        targets.append(
            f"sdjax time x{growth:.1f} from N={small} to {large} (N^2 would be x{bound:.0f}): "
            f"{verdict}"
        )
    return targets


def plot(results, path, title, memory_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in IMPLS:
        rows = sorted(
            (r for r in results if r["impl"] == impl and r["status"] == "ok"), key=lambda r: r["n"]
        )
        if rows:
            sizes = [r["n"] for r in rows]
            ax_time.plot(sizes, [r["median_s"] for r in rows], "o-", label=impl)
            ax_memory.plot(sizes, [r["peak_memory_mb"] for r in rows], "o-", label=impl)
    sdjax_rows = sorted(
        (r for r in results if r["impl"] == "sdjax" and r["status"] == "ok"), key=lambda r: r["n"]
    )
    if sdjax_rows:
        base = sdjax_rows[0]
        sizes = np.array([r["n"] for r in sdjax_rows])
        ax_time.plot(sizes, base["median_s"] * (sizes / base["n"]) ** 2, "k:", label="∝ N²")
    ax_time.set(
        xscale="log", yscale="log", xlabel="N (views)", ylabel="fwd+bwd median (s)", title=title
    )
    ax_memory.set(
        xscale="log", yscale="log", xlabel="N (views)", ylabel=f"{memory_name} (MB)", title="memory"
    )
    for ax in (ax_time, ax_memory):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.agreement_worker:
        print(json.dumps(torch_agreement_result(FLAGS.gpu)))
        return
    if FLAGS.worker:
        impl, n, repeats = FLAGS.worker
        block_size = FLAGS.block_size or None
        print(
            json.dumps(worker(impl, int(n), int(repeats), FLAGS.gpu, block_size, FLAGS.precision))
        )
        return

    if FLAGS.quick:
        sizes = [1024, 4096]
    elif FLAGS.sizes:
        sizes = [int(s) for s in FLAGS.sizes]
    else:
        sizes = list(GPU_SIZES if FLAGS.gpu else CPU_SIZES)
    repeats = FLAGS.repeats or (10 if FLAGS.gpu else 3)
    impls = FLAGS.impls
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise app.UsageError(f"--impls: got {sorted(unknown)}, expected names from {IMPLS}")
    torch_version_name = torch_version()
    has_torch = torch_version_name is not None
    if has_torch:
        loss = check_agreement(FLAGS.gpu)
        print(f"agreement check: sdjax and PyTorch give {loss:.6f}", flush=True)
    matmul_size = FLAGS.matmul_size or (16384 if FLAGS.gpu else 4096)
    gflops = matmul_gflops(FLAGS.gpu, matmul_size)
    import jax

    if FLAGS.gpu:
        gpu_name = jax.devices()[0].device_kind
        device = FLAGS.device_label or f"{gpu_name} (GPU)"
        memory_name = "peak GPU memory"
        memory_note = "peak GPU memory: the framework allocator's peak in the process"
        memory_limit = FLAGS.memory_limit_gb or (
            jax.devices()[0].memory_stats()["bytes_limit"] / 1e9
        )
        slow_calls = ""  # every call is fast enough to repeat
    else:
        device = FLAGS.device_label or f"{cpu_model()}, {os.cpu_count()} cores (CPU)"
        memory_name = "peak RSS"
        memory_note = "peak RSS: the process's VmHWM"
        memory_limit = FLAGS.memory_limit_gb or 20.0
        slow_calls = " (1 at N >= 65536)"
    python = Path(sys.executable).name
    header = [
        f"# S-D loss fwd+bwd: sdjax vs dense PyTorch ({device})",
        "",
        f"- date: {datetime.date.today()}, jax {jax.__version__}, "
        f"torch {torch_version_name or 'not installed'}",
        f"- matmul rate (jax, float32 {matmul_size}x{matmul_size}): {gflops:.1f} GFLOP/s",
        f"- D={FEATURE_DIM}, C={NUM_CLASSES}, label density {LABEL_DENSITY}, one view per "
        f"sample, τ={TEMPERATURE}; sdjax block_size {FLAGS.block_size or 'automatic'}; "
        f"median of {repeats} calls{slow_calls} after a "
        "compile call; inputs on the device before timing; GFLOP/s from "
        f"the dense floor 2·N²·(3D + C); each configuration in its own process ({memory_note}).",
        f"- {PRECISIONS[FLAGS.precision]}",
        f"- command: `{' '.join([python, '-m', 'experiments.bench_loss', *sys.argv[1:]])}`",
    ]
    results = []
    for n in sizes:
        for impl in impls:
            if impl != "sdjax" and not has_torch:
                results.append({"impl": impl, "n": n, "status": "skipped (torch not installed)"})
            elif impl != "sdjax" and estimated_dense_gb(n) > memory_limit:
                results.append(
                    {
                        "impl": impl,
                        "n": n,
                        "status": f"skipped (dense needs ~{estimated_dense_gb(n):.0f} GB)",
                    }
                )
            else:
                print(f"N={n} {impl} ...", flush=True)
                calls = 1 if slow_calls and n >= 65536 else repeats  # minutes a call on a CPU
                results.append(
                    run_config(
                        impl, n, calls, FLAGS.timeout, FLAGS.gpu, FLAGS.block_size, FLAGS.precision
                    )
                )
            r = results[-1]
            print(
                f"  {r['status']}"
                + (
                    f": {r['median_s']:.4f} s, {r['peak_memory_mb']:.0f} MB"
                    if r["status"] == "ok"
                    else ""
                ),
                flush=True,
            )
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_loss_gpu" if FLAGS.gpu else "bench_loss"
    stem += "" if FLAGS.precision == "highest" else f"_{FLAGS.precision}"
    targets = check_targets(results, memory_name)
    write_table(results, header, targets, out_dir / f"{stem}.md", memory_name)
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / f"{stem}.png", device, memory_name)
    print("\n".join(targets))
    print(f"wrote {out_dir / (stem + '.md')} and .png", flush=True)


if __name__ == "__main__":
    app.run(main)
