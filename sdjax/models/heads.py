"""The projection head (to a normalised embedding) and the linear multi-label classifier."""

import jax
import jax.numpy as jnp
from flax import nnx


class ProjectionHead(nnx.Module):
    """[B, in_features] -> [B, embed_dim] unit vectors: Linear, ReLU, Linear, L2 normalise.

    The loss normalises again, but the head's output is the embedding users take away (cosine
    retrieval, t-SNE), so it stays a unit vector; removing the step would also change every
    committed result in its last bits. The layers compute in `dtype` (None: float32); the
    normalisation and the output are float32, so the loss sees float32 embeddings.
    """

    def __init__(
        self, in_features: int, hidden_dim: int, embed_dim: int, *, rngs: nnx.Rngs, dtype=None
    ):
        self.hidden = nnx.Linear(in_features, hidden_dim, dtype=dtype, rngs=rngs)
        self.output = nnx.Linear(hidden_dim, embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.output(nnx.relu(self.hidden(x))).astype(jnp.float32)
        squared_norm = jnp.sum(y * y, axis=-1, keepdims=True)
        return y * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))


class LinearClassifier(nnx.Module):
    """[B, in_features] -> [B, num_classes] float32 logits for sigmoid BCE (computed in `dtype`)."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs, dtype=None):
        self.linear = nnx.Linear(in_features, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear(x).astype(jnp.float32)
