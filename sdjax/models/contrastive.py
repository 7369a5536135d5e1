"""An encoder with a stage-1 head, and the joint method's model with its classifier."""

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


class JointModel(ContrastiveModel):
    """`method = "joint"`: encoder, projection head, and a linear classifier on the encoder."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module, classifier: nnx.Module):
        super().__init__(encoder, head)
        self.classifier = classifier

    def classify(self, x: jax.Array) -> jax.Array:
        """[B, ...] inputs -> [B, C] logits of the jointly trained classifier."""
        return self.classifier(self.encoder(x))
