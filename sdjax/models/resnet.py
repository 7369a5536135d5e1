"""A ResNet encoder family for NHWC images."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.models import conv


def _group_norm(channels: int, rngs: nnx.Rngs, dtype) -> nnx.GroupNorm:
    # GroupNorm, not BatchNorm: no batch statistics, so a step is a pure function of the
    # parameters and results do not depend on how the batch is split over devices (and
    # gradient caching's chunks give the same features as the whole batch).
    return nnx.GroupNorm(channels, num_groups=min(8, channels), dtype=dtype, rngs=rngs)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int, rngs, dtype):
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel, kernel),
        strides=stride,
        use_bias=False,
        dtype=dtype,
        conv_general_dilated=conv.conv_general_dilated,
        rngs=rngs,
    )


def _projection(in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs, dtype):
    """The shortcut: a strided 1x1 convolution where a block changes shape, else None."""
    if stride == 1 and in_channels == out_channels:
        return nnx.data(None)
    return _conv(in_channels, out_channels, 1, stride, rngs, dtype)


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (projected when the shape changes)."""

    EXPANSION = 1

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None
    ):
        self.conv1 = _conv(in_channels, out_channels, 3, stride, rngs, dtype)
        self.norm1 = _group_norm(out_channels, rngs, dtype)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, rngs, dtype)
        self.norm2 = _group_norm(out_channels, rngs, dtype)
        self.shortcut = _projection(in_channels, out_channels, stride, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut(x)
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return nnx.relu(y + residual)


class BottleneckBlock(nnx.Module):
    """1x1 reduce, 3x3 (strided, as in ResNet v1.5), 1x1 expand by 4, with a residual.

    The projected shortcut has its own norm, as in the standard ResNet-50.
    """

    EXPANSION = 4

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs, dtype=None
    ):
        inner = out_channels // self.EXPANSION
        self.conv1 = _conv(in_channels, inner, 1, 1, rngs, dtype)
        self.norm1 = _group_norm(inner, rngs, dtype)
        self.conv2 = _conv(inner, inner, 3, stride, rngs, dtype)
        self.norm2 = _group_norm(inner, rngs, dtype)
        self.conv3 = _conv(inner, out_channels, 1, 1, rngs, dtype)
        self.norm3 = _group_norm(out_channels, rngs, dtype)
        self.shortcut = _projection(in_channels, out_channels, stride, rngs, dtype)
        if self.shortcut is not None:
            self.shortcut_norm = _group_norm(out_channels, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = nnx.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return nnx.relu(y + residual)


BLOCKS: dict[str, type[BasicBlock | BottleneckBlock]] = {
    "basic": BasicBlock,
    "bottleneck": BottleneckBlock,
}


class ResNetEncoder(nnx.Module):
    """[B, H, W, C] images -> [B, features_dim] features.

    `stage_sizes` gives the blocks per stage and `block` their kind: (2, 2, 2, 2) with "basic"
    is the ResNet-18 shape, (3, 4, 6, 3) with "basic" ResNet-34 and with "bottleneck" ResNet-50
    (width 64). Every stage after the first halves the resolution and doubles the width; a
    bottleneck stage's output is 4x its width. The stem is a
    `stem_stride` x `stem_stride` convolution with that stride (a patchify stem): 1 keeps full
    resolution, 4 makes the small networks fast on a CPU.

    `dtype` is the compute dtype (None: the inputs' and parameters', float32); parameters are
    float32 whatever it is, and the pooled features are float32.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int] = (1, 1),
        width: int = 16,
        in_channels: int = 1,
        stem_stride: int = 4,
        block: str = "basic",
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        if block not in BLOCKS:
            raise ValueError(
                f"config.model.encoder.block: got {block!r}, expected one of {sorted(BLOCKS)}."
            )
        if not stage_sizes or any(int(n) < 1 for n in stage_sizes):
            raise ValueError(
                f"config.model.encoder.stage_sizes: got {stage_sizes!r}, "
                "expected a non-empty list of ints >= 1."
            )
        if min(width, in_channels, stem_stride) < 1:
            raise ValueError(
                "config.model.encoder.width/in_channels/stem_stride: got "
                f"{width}/{in_channels}/{stem_stride}, expected ints >= 1."
            )
        stem_kernel = (max(3, stem_stride),) * 2 if stem_stride == 1 else (stem_stride,) * 2
        self.stem = nnx.Conv(
            in_channels,
            width,
            stem_kernel,
            strides=stem_stride,
            use_bias=False,
            dtype=dtype,
            conv_general_dilated=conv.conv_general_dilated,
            rngs=rngs,
        )
        self.stem_norm = _group_norm(width, rngs, dtype)
        blocks, channels = [], width
        for stage, num_blocks in enumerate(stage_sizes):
            out_channels = width * 2**stage * BLOCKS[block].EXPANSION
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(BLOCKS[block](channels, out_channels, stride, rngs=rngs, dtype=dtype))
                channels = out_channels
        self.blocks = nnx.List(blocks)
        self.features_dim = channels

    def __call__(self, images: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_norm(self.stem(images)))
        for block in self.blocks:
            x = block(x)
        # Pool in float32 (a no-op for float32 activations): features leave the encoder exact.
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
