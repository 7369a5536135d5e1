"""XLA:CPU's slow convolutions, reproduced: a 3x3 kernel over a 2x2 input, and gradients in a loop.

1. `f32[32,2,2,512]` images, a `3x3x512x512` kernel, SAME padding (a ResNet's last stage on
   64 px images): the kernel covers more pixels than the image, XLA swaps the operands, and
   the swapped convolution runs in a generic loop. The same product as im2col (patches, then
   one matmul: `sdjax.models.conv.im2col_conv`) runs at matmul speed.
2. The kernel gradient of a 3x3 convolution over `f32[16,16,16,64]`, four times: at the top
   level XLA rewrites it into the canonical layout; inside `lax.scan` (gradient caching's
   loop) it stays in another one, again a generic loop. `sdjax.models.conv` writes the
   gradients as canonical convolutions itself.

Prints each form's time (median of 5 calls after a compile call) and the `dim_labels` of the
convolutions XLA compiled; the canonical form is `b01f_01io->b01f`.

COMMAND (from the repository root):
  .venv/bin/python -m experiments.conv_repro > experiments/results/conv_repro.txt
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.suite import cpu_model
from sdjax.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def timed(fn, *args, calls: int = 5) -> tuple[float, list[str]]:
    """(median seconds per call, the compiled convolutions' dim_labels)."""
    compiled = jax.jit(fn).lower(*args).compile()
    labels = sorted(set(re.findall(r"dim_labels=([^,\s}]+)", compiled.as_text())))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), labels


def report(name: str, flops: float, seconds: float, labels: list[str]) -> None:
    print(
        f"| {name} | {1e3 * seconds:.1f} | {flops / seconds / 1e9:.1f} | "
        f"{', '.join(labels) or '(none: a matmul)'} |"
    )


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {cpu_model()}, {os.cpu_count()} cores, float32")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| form | ms | GFLOP/s | dim_labels |\n|---|---:|---:|---|")

    # 1. A 3x3 kernel over 2x2 images.
    images = jnp.asarray(rng.normal(size=(32, 2, 2, 512)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 512, 512)) / 48, jnp.float32)
    # Nonzero products only: each output pixel sees the 2x2 image through 4 of the 9 taps.
    flops = 2 * 32 * 4 * 4 * 512 * 512

    def lax_conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    def im2col(x, w):
        return conv.im2col_conv(x, w, (1, 1), ((1, 1), (1, 1)))

    def forward_backward(fn):
        return jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), (0, 1))

    np.testing.assert_allclose(
        jax.jit(im2col)(images, kernel), jax.jit(lax_conv)(images, kernel), rtol=1e-4, atol=1e-4
    )
    for name, fn, work in (
        ("2x2 input, 3x3 kernel, forward: lax.conv_general_dilated", lax_conv, flops),
        ("2x2 input, 3x3 kernel, forward: im2col", im2col, flops),
        (
            "2x2 input, 3x3 kernel, forward + both gradients: lax",
            forward_backward(lax_conv),
            3 * flops,
        ),
        (
            "2x2 input, 3x3 kernel, forward + both gradients: im2col",
            forward_backward(im2col),
            3 * flops,
        ),
    ):
        report(name, work, *timed(fn, images, kernel))

    # 2. Kernel gradients, four chunks of 16 images, at the top level and in a loop.
    images = jnp.asarray(rng.normal(size=(4, 16, 16, 16, 64)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    flops = 4 * 2 * 16 * 16 * 16 * 9 * 64 * 64

    def kernel_grad(conv_fn):
        def grad(x, w):
            return jax.grad(
                lambda w: jnp.sum(jnp.sin(conv_fn(x, w, (1, 1), "SAME", dimension_numbers=NHWC)))
            )(w)

        return grad

    for name, conv_fn in (
        ("lax", lax.conv_general_dilated),
        ("sdjax.models.conv", conv.conv_general_dilated),
    ):
        grad = kernel_grad(conv_fn)
        unrolled = lambda x, w, grad=grad: sum(grad(x[i], w) for i in range(4))
        scanned = lambda x, w, grad=grad: lax.scan(
            lambda total, chunk: (total + grad(chunk, w), None), jnp.zeros_like(w), x
        )[0]
        report(
            f"4 kernel gradients, 16x16 input, top level: {name}",
            flops,
            *timed(unrolled, images, kernel),
        )
        report(
            f"4 kernel gradients, 16x16 input, in lax.scan: {name}",
            flops,
            *timed(scanned, images, kernel),
        )


if __name__ == "__main__":
    main()
