"""An MLP encoder for tabular features."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLPEncoder(nnx.Module):
    """[B, in_features] -> [B, features_dim]: Linear, LayerNorm, GELU and dropout per layer.

    The layers compute in `dtype` (None: float32); parameters and features are float32.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (256, 256),
        dropout_rate: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        if in_features < 1 or not hidden_sizes or any(h < 1 for h in hidden_sizes):
            raise ValueError(
                f"config.model.encoder: got in_features={in_features}, "
                f"hidden_sizes={hidden_sizes!r}, expected positive sizes."
            )
        if not 0 <= dropout_rate < 1:
            raise ValueError(
                f"config.model.encoder.dropout_rate: got {dropout_rate}, expected [0, 1)."
            )
        layers: list[nnx.Module] = []
        size = in_features
        for hidden in hidden_sizes:
            layers.append(nnx.Linear(size, hidden, dtype=dtype, rngs=rngs))
            layers.append(nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs))
            size = hidden
        self.layers = nnx.List(layers)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.features_dim = size

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.layers[::2], self.layers[1::2], strict=True):
            x = self.dropout(nnx.gelu(norm(linear(x))))
        return x.astype(jnp.float32)
