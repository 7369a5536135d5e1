"""MoCo's key side: a momentum (EMA) copy of the encoder and head, and a label-carrying queue."""

import jax
import jax.numpy as jnp
from flax import nnx


class QueueState(nnx.Variable):
    """MoCo's queue and its bookkeeping: state that is checkpointed but never optimised."""


class MomentumEncoder(nnx.Module):
    """MoCo's key side: an EMA copy of the encoder and projection head, and a FIFO queue.

    The queue holds the last `queue_size` keys with their labels (a ring buffer: entries
    `[pointer, pointer + B)` are replaced by the newest batch). It starts empty: `queue_valid`
    marks the filled entries, so the loss sees only real keys. All of it is `nnx.state(self)`,
    which the trainer checkpoints with the model, so a resumed run continues exactly.

    References:
      He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", 2020.
    """

    def __init__(self, model, *, queue_size: int, num_classes: int):
        self.encoder = nnx.clone(model.encoder)
        self.head = nnx.clone(model.head)
        # A clone's dropout streams would repeat the query encoder's masks: give it its own.
        rng_keys = nnx.state(self, nnx.RngKey)
        nnx.update(self, jax.tree.map(lambda key: jax.random.fold_in(key, 1), rng_keys))
        embed_dim = model.head.output.out_features
        self.queue = QueueState(jnp.zeros((queue_size, embed_dim), jnp.float32))
        self.queue_labels = QueueState(jnp.zeros((queue_size, num_classes), jnp.float32))
        self.queue_valid = QueueState(jnp.zeros((queue_size,), bool))
        self.queue_pointer = QueueState(jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The keys of inputs `x`: [B, embed_dim], without gradient."""
        return jax.lax.stop_gradient(self.head(self.encoder(x)))

    def follow(self, model, momentum: float) -> None:
        """One EMA step towards `model`: p_k <- momentum * p_k + (1 - momentum) * p_q."""
        for mine, theirs in ((self.encoder, model.encoder), (self.head, model.head)):
            updated = jax.tree.map(
                lambda k, q: momentum * k + (1 - momentum) * q,
                nnx.state(mine, nnx.Param),
                nnx.state(theirs, nnx.Param),
            )
            nnx.update(mine, updated)

    def enqueue(self, keys: jax.Array, labels: jax.Array, sharding=None) -> None:
        """Replaces the oldest `B` entries by `keys` and `labels` (B divides `queue_size`).

        `sharding`: the queue's, kept through the update (inside jit).
        """
        pointer = self.queue_pointer.value

        def put(queue, rows):
            updated = jax.lax.dynamic_update_slice_in_dim(
                queue, rows.astype(queue.dtype), pointer, axis=0
            )
            return (
                updated if sharding is None else jax.lax.with_sharding_constraint(updated, sharding)
            )

        self.queue.value = put(self.queue.value, keys)
        self.queue_labels.value = put(self.queue_labels.value, labels)
        self.queue_valid.value = put(self.queue_valid.value, jnp.ones(keys.shape[:1], bool))
        self.queue_pointer.value = (pointer + keys.shape[0]) % self.queue.value.shape[0]
