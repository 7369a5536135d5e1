"""2-D convolutions in the forms that XLA's CPU backend runs fast, forward and backward.

XLA:CPU runs a convolution at matmul speed only in the canonical layout (NHWC images, HWIO
kernel, NHWC output); any other form falls to a generic loop one to two orders of magnitude
slower. Two cases leave that layout (experiments/conv_repro.py times them):

- a kernel that covers more pixels than its input (3x3 over a 2x2 or 1x1 feature map, as in
  a ResNet's last stage on small images): XLA's algebraic simplifier swaps the operands, in
  the forward pass and in the input gradient when the kernel covers more pixels than the
  output. Here such a convolution is im2col instead: the kernel's strided views of the padded
  input side by side, then one matmul.
- the gradients inside a loop (`lax.scan`, as in gradient caching): at the top level XLA
  rewrites the input- and kernel-gradient convolutions into the canonical layout, in a loop
  body it does not. Here both gradients are written as canonical convolutions of explicitly
  transposed operands (the same arithmetic as XLA's own rewrite, bit for bit).

A 1x1 convolution is exactly a matmul of the (strided) input, and is computed as one on every
backend: its kernel gradient, a plain matmul contracting the batch and space, runs 4-8x faster
on XLA:CPU than the kernel-gradient convolution (with its transposed copies of both operands),
and a GPU or TPU convolution library runs a 1x1 convolution as that matmul anyway.

The kernel gradients, convolutions or matmuls, need transposed copies of their operands; on
XLA:CPU these are made from materialised arrays (an optimisation barrier), and a matmul takes
the form that XLA:CPU hands to YNNPACK with the smaller copy.

All choices depend on static shapes only, and all compute the same sums (im2col in another
order), so a module using `conv_general_dilated` has the parameters, names and shapes of
`nnx.Conv`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# flax's channels-last 2-D convolution: images NHWC, kernels HWIO.
_NHWC = ("NHWC", "HWIO", "NHWC")


def kernel_exceeds_feature_map(
    input_hw: Sequence[int], kernel_hw: Sequence[int], output_hw: Sequence[int]
) -> bool:
    """Whether XLA would swap the forward or the input-gradient convolution's operands.

    The forward convolution's input is the feature map; the input gradient's is the output
    gradient, of the output's size. XLA swaps when the kernel's area exceeds its input's.
    """
    kernel_area = kernel_hw[0] * kernel_hw[1]
    return kernel_area > min(input_hw[0] * input_hw[1], output_hw[0] * output_hw[1])


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated`, computed in forms XLA:CPU runs fast (see the module doc).

    A drop-in for `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`. It covers
    plain channels-last 2-D convolutions (no dilation, one group); anything else goes to
    `lax.conv_general_dilated` unchanged. Differentiable in reverse mode (a `custom_vjp`).
    """
    plain = (
        lhs.ndim == 4
        and feature_group_count == batch_group_count == 1
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and preferred_element_type is None
        and not any(kwargs.values())  # out_sharding
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return _conv(lhs, rhs, strides, pads, precision)


def im2col_conv(
    images: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision=None,
) -> jax.Array:
    """[N, H, W, C] images, [KH, KW, C, O] kernel -> [N, H', W', O] (H', W' >= 1): a matmul.

    The patches are KH * KW strided slices of the padded images (no convolution, so neither
    pass has one for XLA to swap), laid out (KH, KW, C) like the kernel's rows.
    """
    patches = _patches(images, kernel.shape[:2], strides, padding)
    return lax.dot_general(
        patches,
        kernel.reshape((-1, kernel.shape[3])),
        (((3,), (0,)), ((), ())),
        precision=precision,
    )


def _patches(images, kernel_hw, strides, padding) -> jax.Array:
    """[N, H, W, C] -> [N, H', W', KH * KW * C]: the taps side by side (one tap: the strided
    input, no copy)."""
    taps = _taps(images, kernel_hw, strides, padding)
    if len(taps) == 1:
        return taps[0]
    return jnp.stack(taps, axis=3).reshape((*taps[0].shape[:3], -1))


def _taps(images, kernel_hw, strides, padding) -> list[jax.Array]:
    """[N, H, W, C] -> KH * KW of [N, H', W', C]: the strided views of the padded images that
    each of the kernel's taps sees, in the kernel's (KH, KW) order."""
    (kernel_h, kernel_w), (stride_h, stride_w) = kernel_hw, strides
    out_h, out_w = _output_size(images.shape[1:3], kernel_hw, strides, padding)
    padded = lax.pad(
        images,
        jnp.zeros((), images.dtype),
        ((0, 0, 0), *((low, high, 0) for low, high in padding), (0, 0, 0)),
    )
    return [
        lax.slice(
            padded,
            (0, i, j, 0),
            (
                padded.shape[0],
                i + stride_h * (out_h - 1) + 1,
                j + stride_w * (out_w - 1) + 1,
                images.shape[3],
            ),
            (1, stride_h, stride_w, 1),
        )
        for i in range(kernel_h)
        for j in range(kernel_w)
    ]


def _im2col_grads(images, kernel, output_grad, strides, padding, precision):
    """Both gradients of `im2col_conv`: matmuls, and the patches' pullback (pads and adds)."""
    patches, unpatch = jax.vjp(lambda x: _patches(x, kernel.shape[:2], strides, padding), images)
    rows = kernel.reshape((-1, kernel.shape[3]))
    (images_grad,) = unpatch(
        lax.dot_general(output_grad, rows, (((3,), (1,)), ((), ())), precision=precision)
    )
    return images_grad, _sum_of_outer_products(patches, output_grad, precision).reshape(
        kernel.shape
    )


def _sum_of_outer_products(a, b, precision) -> jax.Array:
    """[N, H, W, P], [N, H, W, Q] -> [P, Q], summed over N, H, W (a kernel gradient).

    XLA:CPU hands a product to YNNPACK, its fast matmul, only with the first operand as [P, K]
    (K = N * H * W, contracted along its columns), so one operand is copied transposed: `a`, or
    `b` with the [Q, P] product transposed after, whichever copies less.
    """
    contract = (((0, 1, 2), (0, 1, 2)), ((), ()))
    summed, p, q = a.size // a.shape[3], a.shape[3], b.shape[3]
    if p * summed <= q * (summed + p):
        return lax.dot_general(a, b, contract, precision=precision)
    b_by_a = lax.dot_general(b, a, contract, precision=precision)
    if jax.default_backend() == "cpu":
        # Left free, XLA folds the transpose into the product, whose first operand is then
        # contracted along its rows: a form YNNPACK does not take, and XLA:CPU's own matmul
        # runs it 2-3x slower over a long batch (ResNet-50's step: 18 kernel gradients).
        b_by_a = lax.optimization_barrier(b_by_a)
    return b_by_a.T


def _uses_im2col(images_shape, kernel_shape, strides, padding) -> bool:
    """A matmul for a 1x1 kernel (im2col of one tap: the strided input) or one that XLA would
    swap; a convolution otherwise."""
    output_hw = _output_size(images_shape[1:3], kernel_shape[:2], strides, padding)
    return min(output_hw) >= 1 and (
        tuple(kernel_shape[:2]) == (1, 1)
        or kernel_exceeds_feature_map(images_shape[1:3], kernel_shape[:2], output_hw)
    )


def _forward(images, kernel, strides, padding, precision):
    if _uses_im2col(images.shape, kernel.shape, strides, padding):
        return im2col_conv(images, kernel, strides, padding, precision)
    return lax.conv_general_dilated(
        images, kernel, strides, padding, dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(images, kernel, strides, padding, precision):
    return _forward(images, kernel, strides, padding, precision)


def _conv_fwd(images, kernel, strides, padding, precision):
    return _forward(images, kernel, strides, padding, precision), (images, kernel)


def _conv_bwd(strides, padding, precision, residuals, output_grad):
    images, kernel = residuals
    if jax.default_backend() == "cpu":
        # XLA:CPU fuses the gradients' transposed copies of these into their producers (a
        # normalisation's gradient, a ReLU), where a transposing loop is far slower than a
        # plain copy; materialised first, they are copied plainly (ResNet-50: 11% of a step).
        images, output_grad = lax.optimization_barrier((images, output_grad))
    if _uses_im2col(images.shape, kernel.shape, strides, padding):
        return _im2col_grads(images, kernel, output_grad, strides, padding, precision)
    return (
        _input_grad(output_grad, kernel, images.shape, strides, padding, precision),
        _kernel_grad(images, output_grad, kernel.shape, strides, padding, precision),
    )


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad(output_grad, kernel, images_shape, strides, padding, precision):
    """The output gradient, dilated by the strides, convolved with the kernel flipped in space
    and with its channels swapped: a canonical convolution (stride 1) over a transposed copy."""
    flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
    pads = []
    for size, window, stride, (low, _), out in zip(
        images_shape[1:3], kernel.shape[:2], strides, padding, output_grad.shape[1:3], strict=True
    ):
        before = window - 1 - low
        pads.append((before, size + window - 1 - ((out - 1) * stride + 1) - before))
    return lax.conv_general_dilated(
        output_grad,
        flipped,
        (1, 1),
        pads,
        lhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )


def _kernel_grad(images, output_grad, kernel_shape, strides, padding, precision):
    """A canonical convolution with the batch as its channels: images [C, H, W, N] (C as the
    batch) under a window of the output gradient [H', W', N, O], dilated by the strides."""
    pads = []
    for size, window, stride, (low, _), out in zip(
        images.shape[1:3], kernel_shape[:2], strides, padding, output_grad.shape[1:3], strict=True
    ):
        pads.append((low, window + (out - 1) * stride - size - low))
    grad = lax.conv_general_dilated(
        jnp.transpose(images, (3, 1, 2, 0)),
        jnp.transpose(output_grad, (1, 2, 0, 3)),
        (1, 1),
        pads,
        rhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    return jnp.transpose(grad, (1, 2, 0, 3))


def _explicit_padding(input_hw, kernel_hw, strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(
            (int(low), int(high))
            for low, high in lax.padtype_to_pads(input_hw, kernel_hw, strides, padding)
        )
    return tuple((int(low), int(high)) for low, high in padding)


def _output_size(input_hw, kernel_hw, strides, padding) -> tuple[int, ...]:
    return tuple(
        (size + low + high - kernel) // stride + 1
        for size, kernel, stride, (low, high) in zip(
            input_hw, kernel_hw, strides, padding, strict=True
        )
    )
