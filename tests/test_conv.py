"""sdjax.models.conv: the same convolution as lax's, and encoders as accurate as with lax's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from sdjax import models
from sdjax.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")
UNIT_ROUNDOFF = 2.0**-24  # float32

# (images, kernel, stride, padding): the shapes that go to im2col, a matmul: the ResNets' on
# 64 px images (stage 4 at 2x2, its strided entry from 4x4, 1x1 maps; 1x1 kernels, strided as
# in the shortcuts), the edge cases of the padding; and shapes that stay convolutions (the 4x4
# patchify stem, 3x3 over 8x8).
IM2COL_CASES = [
    ((3, 2, 2, 8), (3, 3, 8, 6), 1, "SAME"),
    ((3, 4, 4, 8), (3, 3, 8, 6), 2, "SAME"),
    ((3, 1, 1, 8), (3, 3, 8, 6), 1, "SAME"),
    ((3, 5, 5, 8), (3, 3, 8, 6), 2, "VALID"),
    ((3, 3, 3, 8), (3, 3, 8, 6), 1, ((2, 0), (0, 1))),
    ((3, 8, 8, 8), (1, 1, 8, 6), 1, "SAME"),
    ((3, 8, 7, 8), (1, 1, 8, 6), 2, "SAME"),
    ((3, 5, 4, 8), (1, 1, 8, 6), 2, ((1, 0), (0, 2))),
]
CONV_CASES = [
    ((3, 16, 16, 3), (4, 4, 3, 6), 4, "SAME"),
    ((3, 8, 8, 8), (3, 3, 8, 6), 1, "SAME"),
    ((3, 9, 9, 8), (3, 3, 8, 6), 2, "SAME"),
    ((3, 8, 8, 8), (3, 3, 8, 6), 1, ((2, 0), (0, 1))),
]


def lax_conv(images, kernel, stride, padding):
    return lax.conv_general_dilated(images, kernel, (stride,) * 2, padding, dimension_numbers=NHWC)


def sdjax_conv(images, kernel, stride, padding):
    return conv.conv_general_dilated(images, kernel, (stride,) * 2, padding, dimension_numbers=NHWC)


def uses_lax_conv(images, kernel, stride, padding) -> bool:
    jaxpr = jax.make_jaxpr(lambda x, w: sdjax_conv(x, w, stride, padding))(images, kernel)
    return "conv_general_dilated" in str(jaxpr)


@pytest.mark.slow
@pytest.mark.parametrize("case", IM2COL_CASES + CONV_CASES)
def test_equals_lax_conv_forward_and_gradients(case):
    images_shape, kernel_shape, stride, padding = case
    rng = np.random.default_rng(0)
    images, kernel = rng.normal(size=images_shape), rng.normal(size=kernel_shape)
    assert uses_lax_conv(images, kernel, stride, padding) == (case in CONV_CASES)
    expected = np.asarray(lax_conv(images, kernel, stride, padding))
    cotangent = rng.normal(size=expected.shape)

    def value_and_grads(fn, dtype):
        def loss(x, w):
            return jnp.sum(fn(x, w, stride, padding) * cotangent.astype(dtype))

        x, w = jnp.asarray(images, dtype), jnp.asarray(kernel, dtype)
        outputs = jax.jit(lambda x, w: fn(x, w, stride, padding))(x, w)
        return [np.asarray(a, np.float64) for a in (outputs, *jax.grad(loss, (0, 1))(x, w))]

    # In float64 every result is a sum of the same products: equal to ~1e-16 relative to the
    # sum of their magnitudes (a tap in the wrong place moves a result by a whole product).
    with jax.enable_x64(True):
        got = value_and_grads(sdjax_conv, jnp.float64)
        want = value_and_grads(lax_conv, jnp.float64)
        magnitudes = value_and_grads(
            lambda x, w, *args: lax_conv(jnp.abs(x), jnp.abs(w), *args), jnp.float64
        )[0]
    for got_array, want_array in zip(got, want, strict=True):
        assert got_array.shape == want_array.shape
        np.testing.assert_allclose(got_array, want_array, rtol=0, atol=1e-13 * magnitudes.max())

    # In float32 a sum of K products in another order is within 2 K u of the sum of their
    # magnitudes (K = KH * KW * C), whatever the order: the forward pass checked elementwise.
    got32 = value_and_grads(sdjax_conv, jnp.float32)[0]
    terms = np.prod(kernel_shape[:3])
    assert np.all(np.abs(got32 - want[0]) <= 2 * terms * UNIT_ROUNDOFF * magnitudes)


def test_other_convolutions_go_to_lax_unchanged():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    grouped = conv.conv_general_dilated(
        images, kernel, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
    )
    expected = lax.conv_general_dilated(
        images, kernel, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
    )
    np.testing.assert_array_equal(grouped, expected)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's forms")
@pytest.mark.parametrize(
    "images_shape, kernel_shape",
    [
        ((16, 16, 16, 64), (1, 1, 64, 16)),  # more input channels, a long batch: b copied
        ((16, 16, 16, 16), (1, 1, 16, 64)),  # fewer: the images copied
        ((4, 2, 2, 64), (3, 3, 64, 64)),  # im2col's 576 rows over 16 pixels: patches copied
        ((16, 2, 2, 64), (3, 3, 64, 16)),  # over 64 pixels, 16 columns: output gradient copied
    ],
)
def test_every_matmul_of_the_gradients_runs_in_ynnpack(images_shape, kernel_shape):
    """XLA:CPU runs a product in YNNPACK only with its first operand as [P, K], contracted
    along its columns; a kernel gradient in another form falls to XLA's own matmul (2-3x
    slower over a long batch), a top-level `dot` in the compiled program."""
    images, kernel = jnp.ones(images_shape), jnp.ones(kernel_shape)

    def loss(x, w):
        return jnp.sum(sdjax_conv(x, w, 1, "SAME") ** 2)

    program = jax.jit(jax.grad(loss, (0, 1))).lower(images, kernel).compile().as_text()
    entry = program[program.index("\nENTRY") :]
    assert " dot(" not in entry
    assert "__ynn_fusion" in entry


def smooth_encoder_loss(encoder_graph, rest, probe):
    """A linear function of the features (its gradient does not amplify their rounding),
    with the features as its auxiliary output."""

    def loss(params, images):
        features = nnx.merge(encoder_graph, params, rest, copy=True)(images)
        return jnp.sum(features * probe.astype(features.dtype)), features

    return loss


@pytest.mark.slow
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_encoder_gradients_match_float64_as_closely_as_with_lax_convolutions(block):
    """16 px images through a stem of stride 4 reach 4x4, 2x2 and 1x1 maps: im2col in the
    later stages, convolutions in the first, and the custom gradients in all.

    Measured against the encoder in float64 (inputs and parameters), float32 gradients carry
    rounding of ~1e-6 of the largest gradient entry, with lax's convolutions as with these.
    The sums go in another order, so the two errors differ by a factor near 1; 2x (and the
    absolute 1e-5, ~100 ulps) bound that, while a wrong tap or gradient moves entries by O(1).
    A linear function of the features keeps the comparison smooth: a ReLU whose input is
    within rounding of zero can flip in either float32 version, and that flip (not the
    convolution) moves a whole unit's gradient.
    """
    encoder = models.ResNetEncoder(
        (1, 1, 1), width=8, in_channels=3, stem_stride=4, block=block, rngs=nnx.Rngs(0)
    )
    images = np.random.default_rng(2).random((6, 16, 16, 3))
    probe = np.random.default_rng(3).normal(size=(6, encoder.features_dim))
    graph, params, rest = nnx.split(encoder, nnx.Param, ...)
    loss = smooth_encoder_loss(graph, rest, probe)

    def features_and_grads(params, dtype):
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        grads, features = jax.jit(jax.grad(loss, has_aux=True))(params, jnp.asarray(images, dtype))
        return np.asarray(features, np.float64), [
            np.asarray(g, np.float64) for g in jax.tree.leaves(grads)
        ]

    with jax.enable_x64(True):
        # The encoder pools into float32, so the float64 features are rounded once; the
        # gradients flow back in float64 (a linear loss's cotangent is exact).
        reference_features, reference_grads = features_and_grads(params, jnp.float64)
    scale = max(np.abs(g).max() for g in reference_grads)

    def errors():
        features, grads = features_and_grads(params, jnp.float32)
        feature_error = np.abs(features - reference_features).max() / np.abs(features).max()
        grad_error = max(np.abs(g - r).max() for g, r in zip(grads, reference_grads, strict=True))
        return feature_error, grad_error / scale

    feature_error, grad_error = errors()
    for _, node in nnx.iter_graph(encoder):
        if isinstance(node, nnx.Conv):
            node.conv_general_dilated = lax.conv_general_dilated
    graph, _, rest = nnx.split(encoder, nnx.Param, ...)
    loss = smooth_encoder_loss(graph, rest, probe)
    lax_feature_error, lax_grad_error = errors()
    assert feature_error <= max(2 * lax_feature_error, 1e-5)
    assert grad_error <= max(2 * lax_grad_error, 1e-5)
