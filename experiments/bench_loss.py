"""Benchmark: the S-D loss's forward+backward in sdjax against dense PyTorch, eager and compiled.

Every (implementation, N) runs in a fresh child process, so its peak RSS is its own. Writes
`experiments/results/bench_loss.md` and `bench_loss.png`.

COMMAND:
  make bench                         # installs torch==2.13.0 into .venv, then runs this
  .venv/bin/python experiments/bench_loss.py [--sizes 1024,4096] [--impls sdjax,torch_eager]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FEATURE_DIM = 128
NUM_CLASSES = 80
LABEL_DENSITY = 0.04
TEMPERATURE = 0.07
IMPLS = ("sdjax", "torch_eager", "torch_compile")
RESULTS = Path(__file__).resolve().parent / "results"


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
# Implementations (each returns a function features -> (loss, dloss/dfeatures) as numpy)
# --------------------------------------------------------------------------------------------


def sdjax_value_and_grad(labels: np.ndarray):
    import jax

    from sdjax.losses import similarity_dissimilarity_loss

    labels = jax.numpy.asarray(labels)
    step = jax.jit(
        jax.value_and_grad(
            lambda f: similarity_dissimilarity_loss(f, labels, temperature=TEMPERATURE)
        )
    )
    return lambda features: jax.block_until_ready(step(features))


def torch_sd_loss(features, labels, temperature=TEMPERATURE):
    """SPEC.md's S-D loss, one view per sample, dense N x N: the usual PyTorch formulation."""
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


def torch_value_and_grad(labels: np.ndarray, compiled: bool):
    import torch

    labels = torch.from_numpy(labels)
    loss_fn = torch.compile(torch_sd_loss) if compiled else torch_sd_loss

    def run(features):
        x = torch.from_numpy(np.asarray(features)).requires_grad_(True)
        loss = loss_fn(x, labels)
        loss.backward()
        return loss.detach().numpy(), x.grad.numpy()

    return run


def make_impl(name: str, labels: np.ndarray):
    if name == "sdjax":
        return sdjax_value_and_grad(labels)
    return torch_value_and_grad(labels, compiled=name == "torch_compile")


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


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


def worker(impl: str, num_views: int, repeats: int) -> dict:
    features, labels = make_inputs(num_views)
    run = make_impl(impl, labels)
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
        "peak_rss_mb": peak_rss_mb(),
    }


def check_agreement(num_views: int = 256) -> float:
    """sdjax and the PyTorch reference agree in value and gradient before anything is timed."""
    features, labels = make_inputs(num_views, seed=1)
    loss, grad = sdjax_value_and_grad(labels)(features)
    torch_loss, torch_grad = torch_value_and_grad(labels, compiled=False)(features)
    np.testing.assert_allclose(np.asarray(loss), torch_loss, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), torch_grad, rtol=1e-3, atol=1e-6)
    return float(loss)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def matmul_gflops(size: int = 4096) -> float:
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)).astype(np.float32))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def estimated_dense_gb(num_views: int) -> float:
    # About a dozen live N x N float32 matrices in a dense fwd+bwd.
    return 12 * num_views**2 * 4 / 1e9


def run_config(impl, num_views, repeats, timeout) -> dict:
    command = [sys.executable, __file__, "--worker", impl, str(num_views), str(repeats)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": num_views, "status": f"timeout after {timeout} s"}
    if done.returncode != 0:
        killed = done.returncode in (-9, 137) or "MemoryError" in done.stderr
        status = "OOM (killed)" if killed else f"failed: {done.stderr.strip()[-300:]}"
        return {"impl": impl, "n": num_views, "status": status}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["status"] = "ok"
    result["gflops"] = dense_flops(num_views) / result["median_s"] / 1e9
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_table(results, header, targets, path):
    by_key = {(r["impl"], r["n"]): r for r in results}
    lines = [
        *header,
        "",
        "| N | impl | median fwd+bwd (s) | peak RSS (MB) | GFLOP/s | sdjax / this |",
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
            f"| {r['n']} | {r['impl']} | {r['median_s']:.3f} | {r['peak_rss_mb']:.0f} | "
            f"{r['gflops']:.1f} | {ratio} |"
        )
    lines += ["", "Targets:", *[f"- {t}" for t in targets], ""]
    path.write_text("\n".join(lines))


def check_targets(results) -> list[str]:
    ok = {(r["impl"], r["n"]): r for r in results if r["status"] == "ok"}
    targets = []
    ours, compiled = ok.get(("sdjax", 16384)), ok.get(("torch_compile", 16384))
    if ours and compiled:
        ratio = ours["median_s"] / compiled["median_s"]
        verdict = "PASS" if ratio <= 0.75 else "FAIL"
        targets.append(f"N=16384: sdjax / torch.compile time = {ratio:.2f} (<= 0.75): {verdict}")
    for n, limit in ((16384, 1024), (65536, 2048)):
        if ("sdjax", n) in ok:
            rss = ok[("sdjax", n)]["peak_rss_mb"]
            verdict = "PASS" if rss <= limit else "FAIL"
            targets.append(f"N={n}: sdjax peak RSS {rss:.0f} MB (<= {limit} MB): {verdict}")
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


def plot(results, path, title):
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
            ax_memory.plot(sizes, [r["peak_rss_mb"] for r in rows], "o-", label=impl)
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
        xscale="log", yscale="log", xlabel="N (views)", ylabel="peak RSS (MB)", title="memory"
    )
    for ax in (ax_time, ax_memory):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096,16384,65536")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=20.0,
        help="skip dense PyTorch runs estimated above this",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--device-label", default="", help="e.g. the GPU's name")
    parser.add_argument("--quick", action="store_true", help="sizes 1024,4096 only")
    parser.add_argument(
        "--worker", nargs=3, metavar=("IMPL", "N", "REPEATS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        impl, n, repeats = args.worker
        print(json.dumps(worker(impl, int(n), int(repeats))))
        return

    sizes = [1024, 4096] if args.quick else [int(s) for s in args.sizes.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    unknown = set(impls) - set(IMPLS)
    if unknown:
        parser.error(f"--impls: got {sorted(unknown)}, expected names from {IMPLS}")
    has_torch = torch_available()
    if has_torch:
        print(f"agreement check: sdjax and PyTorch give {check_agreement():.6f}", flush=True)
    gflops = matmul_gflops()
    import jax

    torch_version = __import__("torch").__version__ if has_torch else "not installed"
    device = args.device_label or f"{cpu_model()}, {os.cpu_count()} cores (CPU)"
    header = [
        f"# S-D loss fwd+bwd: sdjax vs dense PyTorch ({device})",
        "",
        f"- date: {datetime.date.today()}, jax {jax.__version__}, torch {torch_version}",
        f"- matmul rate (jax, float32 4096x4096): {gflops:.1f} GFLOP/s",
        f"- D={FEATURE_DIM}, C={NUM_CLASSES}, label density {LABEL_DENSITY}, one view per "
        f"sample, τ={TEMPERATURE}; median of {args.repeats} calls (1 at N >= 65536) after a "
        "compile call; GFLOP/s from "
        "the dense floor 2·N²·(3D + C); each configuration in its own process (peak RSS).",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
    ]
    results = []
    for n in sizes:
        for impl in impls:
            if impl != "sdjax" and not has_torch:
                results.append({"impl": impl, "n": n, "status": "skipped (torch not installed)"})
            elif impl != "sdjax" and estimated_dense_gb(n) > args.memory_limit_gb:
                results.append(
                    {
                        "impl": impl,
                        "n": n,
                        "status": f"skipped (dense needs ~{estimated_dense_gb(n):.0f} GB)",
                    }
                )
            else:
                print(f"N={n} {impl} ...", flush=True)
                repeats = args.repeats if n < 65536 else 1  # one call there takes minutes
                results.append(run_config(impl, n, repeats, args.timeout))
            r = results[-1]
            print(
                f"  {r['status']}"
                + (
                    f": {r['median_s']:.3f} s, {r['peak_rss_mb']:.0f} MB"
                    if r["status"] == "ok"
                    else ""
                ),
                flush=True,
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench_loss" + (f"_{args.device_label.split()[0].lower()}" if args.device_label else "")
    targets = check_targets(results)
    write_table(results, header, targets, args.out_dir / f"{stem}.md")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out_dir / f"{stem}.png", device)
    print("\n".join(targets))
    print(f"wrote {args.out_dir / (stem + '.md')} and .png", flush=True)


if __name__ == "__main__":
    main()
