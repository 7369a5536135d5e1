"""XLA:CPU's slow convolutions, reproduced: a 3x3 kernel over a 2x2 input, and gradients in a loop.

1. `f32[32,2,2,512]` images, a `3x3x512x512` kernel, SAME padding (a ResNet's last stage on
   64 px images): the kernel covers more pixels than the image, XLA swaps the operands, and
   the swapped convolution runs in a generic loop. The same product as im2col (patches, then
   one matmul: `sdjax.models.conv.im2col_conv`) runs at matmul speed.
2. The kernel gradient of a 3x3 convolution over `f32[16,16,16,64]`, four times: at the top
   level XLA rewrites it into the canonical layout; inside `lax.scan` (gradient caching's
   loop) it stays in another one, again a generic loop. `sdjax.models.conv` writes the
   gradients as canonical convolutions itself.
3. A 1x1 convolution's kernel gradient, a matmul over the batch and space, with more input
   channels than output channels (ResNet-50's stages 1 and 3): written as the transpose of
   the smaller product, XLA folds the transpose into the product, whose first operand is then
   contracted along its rows, a form that XLA:CPU runs in its own matmul instead of YNNPACK's.

Prints each form's time (median of 5 calls after a compile call) and how XLA compiled it: the
`dim_labels` of its convolutions (the canonical form is `b01f_01io->b01f`) and which matmul
runs its dots.

`--part=errors` asks whether im2col is less accurate than XLA's convolutions: the float32
gradient of the training benchmark's ResNet-18 step (S-D loss) against the same network in
float64, with every convolution as lax's, as sdjax's (`sdjax.models.conv`) and as im2col, each
run twice: as it is, and with every ReLU's on/off pattern taken from the float64 run. A ReLU
whose input float32 rounds to the other side of zero moves a whole unit's gradient; the fixed
patterns leave only the arithmetic's rounding. It also counts the ReLU units that flipped.

COMMAND (from the repository root):
  .venv/bin/python -m experiments.conv_repro > experiments/results/conv_repro.txt
  .venv/bin/python -m experiments.conv_repro --part=errors > experiments/results/conv_errors.txt
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax import lax

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import bench_train, profile_train_step
from experiments.suite import cpu_model
from sdjax import models
from sdjax.models import conv, heads, resnet

NHWC = ("NHWC", "HWIO", "NHWC")
# Which matmul runs a compiled dot (`profile_train_step.compiled_dots`' "library").
DOT_LABELS = {"YNNPACK": "YNNPACK's dot", "XLA": "XLA's own dot"}

flags.DEFINE_enum("part", "speed", ["speed", "errors"], "What to reproduce (see the doc).")
flags.DEFINE_list("error_seeds", ["0", "1", "2"], "--part=errors: model and batch seeds.")
flags.DEFINE_integer("error_batch", 32, "--part=errors: examples (x2 views, 64 px).")
FLAGS = flags.FLAGS


def timed(fn, *args, calls: int = 5) -> tuple[float, list[str]]:
    """(median seconds per call, how XLA compiled its products: the convolutions' dim_labels,
    and which matmul runs each dot: YNNPACK's, in a fusion, or XLA's own, at the top level)."""
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    labels = sorted(set(re.findall(r"dim_labels=([^,\s}]+)", text)))
    libraries = {dot["library"] for dot in profile_train_step.compiled_dots(text).values()}
    labels += [label for library, label in DOT_LABELS.items() if library in libraries]
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), labels


def report(name: str, flops: float, seconds: float, labels: list[str]) -> None:
    print(f"| {name} | {1e3 * seconds:.1f} | {flops / seconds / 1e9:.1f} | {', '.join(labels)} |")


def main(argv) -> None:
    del argv
    if FLAGS.part == "errors":
        gradient_errors([int(s) for s in FLAGS.error_seeds], FLAGS.error_batch)
    else:
        speed()


def speed() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {cpu_model()}, {os.cpu_count()} cores, float32")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| form | ms | GFLOP/s | compiled as |\n|---|---:|---:|---|")

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

    # 3. A 1x1 convolution's kernel gradient, a matmul over the batch and space, with more
    # input channels than output: the transpose of the [Q, P] product that copies less,
    # left free, becomes a product whose first operand is contracted along its rows.
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
    for batch, side, inputs, outputs in ((64, 16, 256, 64), (64, 4, 1024, 256)):
        images = jnp.asarray(rng.normal(size=(batch, side, side, inputs)), jnp.float32)
        output_grad = jnp.asarray(rng.normal(size=(batch, side, side, outputs)), jnp.float32)
        flops = 2 * batch * side * side * inputs * outputs
        shape = f"[{batch}, {side}, {side}, {inputs}] x [.., {outputs}]"
        for name, fn in (
            ("the transpose left free", lambda a, b: lax.dot_general(b, a, contract).T),
            ("sdjax.models.conv", lambda a, b: conv._sum_of_outer_products(a, b, None)),
        ):
            report(f"1x1 kernel gradient, {shape}: {name}", flops, *timed(fn, images, output_grad))


def im2col_everywhere(lhs, rhs, window_strides, padding, **kwargs):
    """Every convolution as im2col (the ResNets' are all plain NHWC ones), differentiated by
    JAX itself."""
    del kwargs
    pads = conv._explicit_padding(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return conv.im2col_conv(lhs, rhs, window_strides, pads)


CONVOLUTIONS = {
    "lax.conv_general_dilated": lax.conv_general_dilated,
    "sdjax.models.conv": conv.conv_general_dilated,
    "im2col everywhere": im2col_everywhere,
}


class _Float64Casts:
    """`jnp` for the model modules, with float32 read as float64: the encoder pools and the head
    normalises in float32 on purpose, which would round the float64 reference."""

    def __getattr__(self, name):
        return jnp.float64 if name == "float32" else getattr(jnp, name)


class _ReLUs:
    """nnx.relu, recording each call's on/off pattern, or applying given patterns in order."""

    def __init__(self, patterns=None):
        self.patterns, self.recorded = patterns, []

    def __call__(self, x):
        self.recorded.append(x > 0)
        if self.patterns is None:
            return jnp.maximum(x, jnp.zeros((), x.dtype))
        return jnp.where(self.patterns[len(self.recorded) - 1], x, jnp.zeros((), x.dtype))


def layer_errors() -> None:
    """ResNet-18's 3x3 layers at 64 px, batch 64, in float32 as XLA's convolution and as im2col:
    the error against float64 in units of roundoff of the sum of the products' magnitudes."""
    rng = np.random.default_rng(0)
    matrices = rng.normal(size=(256, 4608)), rng.normal(size=(4608, 512))
    default, highest = (
        jax.jit(lambda a, b, p=p: lax.dot(a, b, precision=p))(
            *(m.astype(np.float32) for m in matrices)
        )
        for p in (None, "highest")
    )
    print(
        f"float32 matmul, jax_default_matmul_precision={jax.config.jax_default_matmul_precision}:"
        f" the same bits as precision='highest': {bool(np.array_equal(default, highest))}\n"
    )
    print("| layer | form | largest error / (u x magnitude) | median |\n|---|---|---:|---:|")
    pads = ((1, 1), (1, 1))
    for size, channels in ((16, 64), (8, 128), (4, 256), (2, 512)):
        images = rng.normal(size=(64, size, size, channels))
        kernel = rng.normal(size=(3, 3, channels, channels))
        with jax.enable_x64(True):
            exact = np.asarray(
                lax.conv_general_dilated(images, kernel, (1, 1), pads, None, None, NHWC)
            )
            magnitude = np.asarray(
                lax.conv_general_dilated(
                    np.abs(images), np.abs(kernel), (1, 1), pads, None, None, NHWC
                )
            )
        forms = {
            "lax.conv_general_dilated": lambda x, w: lax.conv_general_dilated(
                x, w, (1, 1), pads, dimension_numbers=NHWC
            ),
            "im2col": lambda x, w: conv.im2col_conv(x, w, (1, 1), pads),
        }
        for name, form in forms.items():
            got = jax.jit(form)(images.astype(np.float32), kernel.astype(np.float32))
            units = np.abs(np.asarray(got, np.float64) - exact) / magnitude / 2.0**-24
            print(
                f"| 3x3, {size}x{size}x{channels} | {name} | {units.max():.2f} | "
                f"{np.median(units):.2f} |"
            )
    print()


def gradient_errors(seeds: list[int], batch_size: int) -> None:
    print(f"jax {jax.__version__}, {cpu_model()}, {os.cpu_count()} cores")
    layer_errors()
    print(
        f"ResNet-18 of experiments/bench_train.py, {batch_size} x 2 views of 64 px, S-D loss; "
        "error: the largest difference of any parameter's gradient from float64's (with lax "
        "convolutions), over the largest float64 gradient entry\n"
    )
    print(
        "| seed | convolutions | float32 error | ReLU units flipped (layers) | "
        "float32 error, float64's ReLU patterns | float64 error |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for seed in seeds:
        for row in seed_errors(seed, batch_size):
            print(row, flush=True)


def seed_errors(seed: int, batch_size: int):
    """The table's rows for one model and batch seed."""
    model = models.create_model(
        bench_train.sdjax_config("resnet18", gpu=False), bench_train.NUM_CLASSES, seed
    )
    views, labels = bench_train.make_batch(batch_size, 64, seed=seed)
    images = views.reshape((-1, *views.shape[2:]))
    convolutions = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Conv)]
    for _, node in nnx.iter_graph(model):  # compute in the inputs' dtype, float64 included
        if isinstance(node, nnx.Module) and getattr(node, "dtype", None) is not None:
            node.dtype = None

    def grads(convolution, dtype, patterns=None):
        """(gradient leaves, ReLU patterns) with every convolution as `convolution`."""
        for node in convolutions:
            node.conv_general_dilated = CONVOLUTIONS[convolution]
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        relus = _ReLUs(patterns)

        def loss(params):
            relus.recorded.clear()
            outputs = nnx.merge(graph, params, rest, copy=True)(jnp.asarray(images, dtype))
            value = bench_train.sdjax_loss_of_outputs(outputs, jnp.asarray(labels, dtype))
            return value, list(relus.recorded)

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(nnx, "relu", relus))
            if dtype == jnp.float64:
                for module in (resnet, heads):
                    stack.enter_context(mock.patch.object(module, "jnp", _Float64Casts()))
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            gradient, recorded = jax.jit(jax.grad(loss, has_aux=True))(params)
        leaves = [np.asarray(g, np.float64) for g in jax.tree.leaves(gradient)]
        return leaves, [np.asarray(r) for r in recorded]

    with jax.enable_x64(True):
        reference, reference_patterns = grads("lax.conv_general_dilated", jnp.float64)
        float64 = {name: grads(name, jnp.float64)[0] for name in CONVOLUTIONS}
    scale = max(np.abs(g).max() for g in reference)

    def error(gradient):
        return max(np.abs(g - r).max() for g, r in zip(gradient, reference, strict=True)) / scale

    for name in CONVOLUTIONS:
        gradient, patterns = grads(name, jnp.float32)
        flips = [int(np.sum(a != b)) for a, b in zip(patterns, reference_patterns, strict=True)]
        fixed, _ = grads(name, jnp.float32, reference_patterns)
        yield (
            f"| {seed} | {name} | {error(gradient):.2g} | {sum(flips)} "
            f"({sum(f > 0 for f in flips)}) | {error(fixed):.2g} | {error(float64[name]):.1g} |"
        )


if __name__ == "__main__":
    app.run(main)
