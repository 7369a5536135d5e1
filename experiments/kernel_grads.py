"""ResNet-50's 3x3 kernel gradients on the CPU: XLA's forms against PyTorch's oneDNN.

In a profile of sdjax's ResNet-50 step op by op (`jax.profiler`, time per HLO operation), the
kernel gradients of the 3x3 convolutions in the first two stages were its slowest operations,
at a quarter to half of the forward convolutions' rate. This times them alone, at the training
benchmark's sizes (64 px, batch 32 x 2 views), each layer's kernel gradient computed:

- by XLA, in every form of the same sums: sdjax's (a canonical convolution with the batch as
  its channels, `sdjax.models.conv`), im2col then one matmul, one matmul per tap, and the taps
  stacked under one batched matmul (each checked against sdjax's before it is timed);
- by PyTorch, `aten::convolution_backward` for the weight alone (oneDNN, channels-last);

and each layer's forward convolution in both, for the rate to compare with, and the im2col
form's matmul alone in both, its patches given (XLA's dot kernel against PyTorch's at the
kernel gradient's shape). Each framework
runs in its own process, the two alternating round after round; a time is the median of
`CALLS` calls in a round, the table shows each round's. Writes `results/kernel_grads.{md,json}`.
About 2 minutes on the 2-core CPU; run it with nothing else on the machine.

COMMAND:
  python -m experiments.kernel_grads
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

if __package__ in (None, ""):  # run as a script (the PyTorch worker): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_loss import cpu_model, interpreter, torch_version, worker_json

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This script's flags, defined when it runs (other experiments define their own
    `--rounds`, and a process may import several of them)."""
    flags.DEFINE_integer("rounds", 3, "Rounds, each timing both frameworks in turn.")
    flags.DEFINE_string("framework_worker", "", "Internal: xla or torch, one round here.")


RESULTS = Path(__file__).resolve().parent / "results"
CALLS = 7
# ResNet-50's 3x3 layers at 64 px, batch 32 x 2 views: (name, images NHWC, stride, padding);
# the padding is sdjax's (SAME), which PyTorch's symmetric padding 1 matches at stride 1. At
# stride 2 SAME pads (0, 1): PyTorch, padding 1, sees one more row and column at the start,
# the same work.
LAYERS = (
    ("stage 1, 16x16x64", (64, 16, 16, 64), 1, ((1, 1), (1, 1))),
    ("stage 2 entry, 16x16x128, stride 2", (64, 16, 16, 128), 2, ((0, 1), (0, 1))),
    ("stage 2, 8x8x128", (64, 8, 8, 128), 1, ((1, 1), (1, 1))),
    ("stage 3, 4x4x256", (64, 4, 4, 256), 1, ((1, 1), (1, 1))),
)
XLA_FORMS = (
    "sdjax (convolution, batch as channels)",
    "im2col, one matmul",
    "one matmul per tap",
    "taps stacked, one batched matmul",
)
# The im2col form's matmul with its patches already built, in both frameworks: XLA's dot
# kernel against PyTorch's BLAS at the kernel gradient's shape ([9C, B*H*W] @ [B*H*W, C]).
MATMUL = "matmul alone ([9C, BHW] @ [BHW, C], patches given)"


def output_hw(shape, stride) -> tuple[int, int]:
    return ((shape[1] - 1) // stride + 1, (shape[2] - 1) // stride + 1)


def flops(shape, stride) -> int:
    """Multiply-adds x 2 of the layer's forward convolution, and so of its kernel gradient."""
    height, width = output_hw(shape, stride)
    return 2 * shape[0] * height * width * 9 * shape[3] * shape[3]


def median_ms(fn, *args) -> float:
    """The median of `CALLS` calls after one to compile and warm up."""
    fn(*args)
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def xla_kernel_gradients() -> dict:
    """{form: function(images, output_grad, strides, padding) -> the [3, 3, C, O] gradient}."""
    import jax.numpy as jnp
    from jax import lax

    from sdjax.models import conv

    def kernel_shape(images, output_grad):
        return (3, 3, images.shape[3], output_grad.shape[3])

    def sdjax_form(images, output_grad, strides, padding):
        shape = kernel_shape(images, output_grad)
        return conv._kernel_grad(images, output_grad, shape, strides, padding, None)

    def im2col(images, output_grad, strides, padding):
        patches = conv._patches(images, (3, 3), strides, padding)
        grad = conv._sum_of_outer_products(patches, output_grad, None)
        return grad.reshape(kernel_shape(images, output_grad))

    def per_tap(images, output_grad, strides, padding):
        contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
        grads = [
            lax.dot_general(tap, output_grad, contract)
            for tap in conv._taps(images, (3, 3), strides, padding)
        ]
        return jnp.stack(grads).reshape(kernel_shape(images, output_grad))

    def batched(images, output_grad, strides, padding):
        stacked = jnp.stack(conv._taps(images, (3, 3), strides, padding))
        grads = lax.dot_general(stacked, output_grad, (((1, 2, 3), (0, 1, 2)), ((), ())))
        return grads.reshape(kernel_shape(images, output_grad))

    return dict(zip(XLA_FORMS, (sdjax_form, im2col, per_tap, batched), strict=True))


def xla_round() -> dict:
    """{layer: {form or "forward": ms}} in XLA, each form checked against sdjax's first."""
    import functools

    import jax
    from jax import lax

    def waited(fn):
        return lambda *args: jax.block_until_ready(fn(*args))

    forms, rng, times = xla_kernel_gradients(), np.random.default_rng(0), {}
    for layer, shape, stride, padding in LAYERS:
        images = rng.normal(size=shape).astype(np.float32)
        kernel = rng.normal(size=(3, 3, shape[3], shape[3])).astype(np.float32)
        output_grad = rng.normal(size=(shape[0], *output_hw(shape, stride), shape[3]))
        output_grad = output_grad.astype(np.float32)
        strides = (stride, stride)
        compiled = {
            form: waited(jax.jit(functools.partial(fn, strides=strides, padding=padding)))
            for form, fn in forms.items()
        }
        reference = np.asarray(compiled[XLA_FORMS[0]](images, output_grad))
        scale = np.abs(reference).max()
        for fn in compiled.values():
            np.testing.assert_allclose(fn(images, output_grad), reference, atol=1e-5 * scale)
        times[layer] = {form: median_ms(fn, images, output_grad) for form, fn in compiled.items()}
        forward = functools.partial(
            lax.conv_general_dilated,
            window_strides=strides,
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        times[layer]["forward"] = median_ms(waited(jax.jit(forward)), images, kernel)
        patches_t, output_grad_2d = matmul_operands(shape, stride, rng)
        matmul = waited(jax.jit(lambda a, b: a @ b))
        times[layer][MATMUL] = median_ms(matmul, patches_t, output_grad_2d)
    return times


def matmul_operands(shape, stride, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random operands of the layer's kernel gradient as one matmul, each contiguous."""
    rows = shape[0] * int(np.prod(output_hw(shape, stride)))
    patches_t = rng.normal(size=(9 * shape[3], rows)).astype(np.float32)
    return patches_t, rng.normal(size=(rows, shape[3])).astype(np.float32)


def torch_round() -> dict:
    """{layer: {"oneDNN": ms, "forward": ms}}: PyTorch's weight gradient and forward."""
    import torch

    torch.manual_seed(0)
    times, rng = {}, np.random.default_rng(0)
    for layer, shape, stride, _ in LAYERS:
        batch, height, width, channels = shape
        images = torch.randn(batch, channels, height, width).to(memory_format=torch.channels_last)
        kernel = torch.randn(channels, channels, 3, 3).to(memory_format=torch.channels_last)
        output_grad = torch.randn(batch, channels, *output_hw(shape, stride))
        output_grad = output_grad.to(memory_format=torch.channels_last)

        def weight_grad(images=images, kernel=kernel, output_grad=output_grad, stride=stride):
            transposed, output_padding, groups, wanted = False, [0, 0], 1, [False, False, True]
            return torch.ops.aten.convolution_backward(
                output_grad, images, kernel, None, [stride] * 2, [1, 1], [1, 1],
                transposed, output_padding, groups, wanted,
            )[2]  # fmt: skip

        def forward(images=images, kernel=kernel, stride=stride):
            return torch.nn.functional.conv2d(images, kernel, stride=stride, padding=1)

        with torch.no_grad():
            assert tuple(forward().shape[2:]) == output_hw(shape, stride)
            times[layer] = {"oneDNN": median_ms(weight_grad), "forward": median_ms(forward)}
            patches_t, output_grad_2d = map(torch.from_numpy, matmul_operands(shape, stride, rng))
            times[layer][MATMUL] = median_ms(lambda a=patches_t, b=output_grad_2d: a @ b)
    return times


def write_outputs(rounds: list[dict], header: list[str]) -> None:
    (RESULTS / "kernel_grads.json").write_text(
        json.dumps({"header": header, "rounds": rounds}, indent=1) + "\n"
    )
    lines = [f"# ResNet-50's 3x3 kernel gradients on the CPU ({cpu_model()})", "", *header, ""]
    lines += [
        "| layer | framework | computed as | ms in each round | median | GFLOP/s |",
        "|---|---|---|---|---:|---:|",
    ]
    for layer, shape, stride, _ in LAYERS:
        rows = [("XLA", form) for form in (*XLA_FORMS, "forward", MATMUL)]
        rows += [("PyTorch", form) for form in ("oneDNN", "forward", MATMUL)]
        for framework, form in rows:
            times = [r[framework][layer][form] for r in rounds]
            median = float(np.median(times))
            shown = {"forward": "forward convolution", MATMUL: MATMUL}.get(
                form, f"kernel gradient: {form}"
            )
            lines.append(
                f"| {layer} | {framework} | {shown} | {', '.join(f'{t:.1f}' for t in times)} "
                f"| {median:.1f} | {flops(shape, stride) / median / 1e6:.0f} |"
            )
    (RESULTS / "kernel_grads.md").write_text("\n".join(lines) + "\n")


def main(argv):
    del argv
    if FLAGS.framework_worker:
        print(json.dumps(xla_round() if FLAGS.framework_worker == "xla" else torch_round()))
        return
    rounds = []
    for round_number in range(FLAGS.rounds):
        timed = {}
        for framework, impl, command in (
            ("XLA", "sdjax", ["-m", "experiments.kernel_grads"]),
            ("PyTorch", "torch", [__file__]),
        ):
            print(f"round {round_number + 1}: {framework}", flush=True)
            worker = "xla" if framework == "XLA" else "torch"
            timed[framework] = worker_json(
                [interpreter(impl), *command, f"--framework_worker={worker}"], gpu=False
            )
        rounds.append(timed)
    import jax

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"- date: {now}, jax {jax.__version__}, torch {torch_version()}, float32",
        f"- {FLAGS.rounds} round(s), each an XLA process then a PyTorch one; a time is the median "
        f"of {CALLS} calls after a warm-up call",
        "- GFLOP/s: the layer's multiply-adds x 2 over the median time",
        f"- command: `python -m experiments.kernel_grads --rounds={FLAGS.rounds}`",
    ]
    write_outputs(rounds, header)


if __name__ == "__main__":
    define_flags()
    app.run(main)
