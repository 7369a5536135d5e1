"""An encoder with a stage-1 head."""

import jax
from flax import nnx


class ContrastiveModel(nnx.Module):
    """`__call__` gives the head's output (an embedding, or logits for the BCE baseline);
    `encode` gives the encoder features that linear evaluation probes."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module):
        self.encoder = encoder
        self.head = head

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.encoder(x))

    def encode(self, x: jax.Array) -> jax.Array:
        return self.encoder(x)
