"""What stage 1 optimises and how: the model, the loss of a global batch (views, encoder +
head, the configured loss), the optimiser, and MoCo's momentum encoder and queue.

`config.framework` picks the contrast set: `"in_batch"` contrasts every view with every other
view of the global batch; `"moco"` contrasts the queries (view 0, the trained encoder) with keys
(view 1, through a momentum copy of encoder and head) of this batch plus a FIFO queue of earlier
keys and their labels (the query/key form of docs/SPEC.md). `config.method = "joint"` adds the
sigmoid BCE of a linear classifier on the encoder to `config.loss.joint_weight` times that loss.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import datasets, losses, models
from sdjax.sharding import BATCH_AXIS, replicate


class JointModel(models.ContrastiveModel):
    """`method = "joint"`: encoder, projection head, and a linear classifier on the encoder."""

    def __init__(self, encoder: nnx.Module, head: nnx.Module, classifier: nnx.Module):
        super().__init__(encoder, head)
        self.classifier = classifier

    def classify(self, x: jax.Array) -> jax.Array:
        """[B, ...] inputs -> [B, C] logits of the jointly trained classifier."""
        return self.classifier(self.encoder(x))


def create_model(config: ml_collections.ConfigDict, num_classes: int):
    """The stage-1 model: `models.create_model`'s, with the classifier of `method = "joint"`."""
    model = models.create_model(config, num_classes, config.seed)
    if config.method != "joint":
        return model
    classifier = models.LinearClassifier(
        model.encoder.features_dim,  # type: ignore[attr-defined]  # every encoder has it
        num_classes,
        rngs=nnx.Rngs(config.seed + 2),
    )  # seed + 1 is the linear probe's
    return JointModel(model.encoder, model.head, classifier)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        decay_steps=config.num_train_steps,
    )


def matrix_parameters(params):
    """A mask of `params`: True where a parameter has two or more dimensions."""
    return jax.tree.map(lambda param: param.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict, model) -> nnx.Optimizer:
    """AdamW with linear warmup and cosine decay over the parameters of `model`.

    With `config.optimizer.decay_only_matrices`, weight decay skips parameters of fewer than two
    dimensions: biases, normalisation scales and per-token weights. With `method = "joint"` and
    `optimizer.classifier_learning_rate` > 0, the classifier's updates are scaled to that peak
    learning rate (AdamW's update, decay included, is proportional to the learning rate).
    """
    only_matrices = config.optimizer.get("decay_only_matrices", False)  # absent in older configs
    transform = optax.adamw(
        learning_rate_schedule(config),
        weight_decay=config.optimizer.weight_decay,
        mask=matrix_parameters if only_matrices else None,
    )
    classifier_rate = config.optimizer.get("classifier_learning_rate", 0.0)
    if config.method == "joint" and classifier_rate:
        ratio = classifier_rate / config.optimizer.learning_rate
        transform = optax.chain(transform, optax.masked(optax.scale(ratio), classifier_parameters))
    return nnx.Optimizer(model, transform, wrt=nnx.Param)


def classifier_parameters(params):
    """A mask of `params`: True for the joint classifier's parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "classifier", params
    )


def make_views_fn(config: ml_collections.ConfigDict) -> Callable:
    """`views(inputs, step) -> [B, V, ...]`: the step's augmented views, a pure function of
    (seed, step), so a resumed run sees the same views."""
    modality = datasets.modality_of(config)
    base_key = jax.random.key(config.seed)
    num_views = 1 if config.method == "bce" else config.num_views

    def views(inputs, step):
        return modality.make_views(jax.random.fold_in(base_key, step), inputs, num_views)

    return views


def make_stage1_loss(config: ml_collections.ConfigDict, mesh) -> Callable:
    """`loss(model, inputs, labels, step, keys=None)`: the stage-1 loss of a global batch.

    `config.method = "contrastive"` scores `num_views` augmented views per example with the
    loss family of `config.loss`; `"bce"` scores one view with sigmoid BCE; `"joint"` adds the
    BCE of `model.classifier` on the encoder features of the views the loss sees (all views
    in-batch, the queries with MoCo) to `loss.joint_weight` times the contrastive loss.

    With `framework = "moco"`, `keys` is the contrast set, `MomentumEncoder.contrast_set`'s
    `losses.Keys`; None (the held-out loss) contrasts the queries with their own samples' view-1
    keys through `model` itself, under stop_gradient, without a queue.
    """
    views_fn = make_views_fn(config)
    moco = config.framework == "moco"
    sharded_loss = _sharded_loss(config, mesh)
    loss_of_outputs = _make_loss_of_outputs(config, sharded_loss)

    def loss_fn(model, inputs, labels, step, keys=None):
        views = views_fn(inputs, step)
        if moco:
            features = model.encode(views[:, 0])
            if keys is None:
                keys = batch_keys(jax.lax.stop_gradient(model(views[:, 1])), labels)
            loss = sharded_loss(model.head(features), labels, keys=keys)
            return _add_joint_bce(config, model, features, labels, loss)
        flat_views = views.reshape((-1, *views.shape[2:]))
        if config.method == "joint":
            features = model.encode(flat_views)
            outputs = model.head(features)
            loss = sharded_loss(outputs.reshape((views.shape[0], views.shape[1], -1)), labels)
            view_labels = jnp.repeat(labels, views.shape[1], axis=0)  # views are sample-major
            return _add_joint_bce(config, model, features, view_labels, loss)
        return loss_of_outputs(model(flat_views), labels)

    return loss_fn


def make_stage1_parts(config: ml_collections.ConfigDict, mesh) -> tuple[Callable, Callable]:
    """The in-batch loss of `method` "contrastive" or "bce" in two parts, for gradient caching
    (`sdjax.gradient_cache`), which runs the model between them chunk by chunk:

    - `flat_views(inputs, step)`: [B, ...] -> [B * V, ...], each example's V views adjacent;
    - `loss_of_outputs(outputs, labels)`: the loss of the model's [B * V, ...] outputs.
    """
    views_fn = make_views_fn(config)

    def flat_views(inputs, step):
        views = views_fn(inputs, step)
        return views.reshape((-1, *views.shape[2:]))

    return flat_views, _make_loss_of_outputs(config, _sharded_loss(config, mesh))


def _sharded_loss(config, mesh) -> Callable:
    return losses.make_sharded_loss(
        mesh,
        BATCH_AXIS,
        positives=config.loss.positives,
        temperature=float(config.loss.temperature),
        jaccard_threshold=float(config.loss.jaccard_threshold),
        block_size=config.loss.block_size or None,
        exchange=config.loss.exchange,
    )


def _make_loss_of_outputs(config, sharded_loss) -> Callable:
    def loss_of_outputs(outputs, labels):
        if config.method == "bce":
            return optax.sigmoid_binary_cross_entropy(outputs, labels).mean()
        return sharded_loss(outputs.reshape((labels.shape[0], -1, outputs.shape[-1])), labels)

    return loss_of_outputs


def _add_joint_bce(config, model, features, labels, contrastive_loss):
    if config.method != "joint":
        return contrastive_loss
    bce = optax.sigmoid_binary_cross_entropy(model.classifier(features), labels).mean()
    return bce + config.loss.joint_weight * contrastive_loss


# --------------------------------------------------------------------------------------------
# MoCo: the momentum encoder and the label-carrying queue
# --------------------------------------------------------------------------------------------


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

    def contrast_set(self, keys: jax.Array, labels: jax.Array) -> losses.Keys:
        """The loss's keys: this batch's keys (each a view of its own sample), then the queue."""
        in_batch = batch_keys(keys, labels)
        queue_size = self.queue.value.shape[0]
        return losses.Keys(
            features=jnp.concatenate([keys, self.queue.value]),
            labels=jnp.concatenate([in_batch.labels, self.queue_labels.value]),
            mask=jnp.concatenate([in_batch.mask, self.queue_valid.value]),
            sample_ids=jnp.concatenate(
                [in_batch.sample_ids, jnp.full((queue_size,), -1, jnp.int32)]
            ),
        )

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


def batch_keys(keys: jax.Array, labels: jax.Array) -> losses.Keys:
    """The loss's keys for one batch's keys alone: key n is a view of global sample n."""
    return losses.Keys(
        features=keys,
        labels=labels.astype(jnp.float32),
        mask=jnp.ones(keys.shape[:1], bool),
        sample_ids=jnp.arange(keys.shape[0], dtype=jnp.int32),
    )


def queue_sharding(mesh) -> NamedSharding:
    """The queue's rows are split over the devices like a batch."""
    return NamedSharding(mesh, P(BATCH_AXIS))


def create_train_state(config: ml_collections.ConfigDict, num_classes: int, mesh):
    """(model, optimizer, momentum encoder or None), placed on `mesh`: parameters and
    optimiser state replicated, the MoCo queue sharded along the batch axis."""
    model = create_model(config, num_classes)
    optimizer = create_optimizer(config, model)
    nnx.update(model, replicate(nnx.state(model), mesh))
    nnx.update(optimizer, replicate(nnx.state(optimizer), mesh))
    if config.framework != "moco":
        return model, optimizer, None
    momentum_encoder = MomentumEncoder(
        model, queue_size=config.moco.queue_size, num_classes=num_classes
    )
    nnx.update(momentum_encoder, replicate(nnx.state(momentum_encoder, nnx.Not(QueueState)), mesh))
    queue = nnx.state(momentum_encoder, QueueState)

    def place(x):  # the pointer is a scalar: replicated
        return jax.device_put(x, queue_sharding(mesh)) if x.ndim else replicate(x, mesh)

    nnx.update(momentum_encoder, jax.tree.map(place, queue))
    return model, optimizer, momentum_encoder


def checkpoint_state(model, optimizer, momentum_encoder=None) -> dict:
    """The `state` item of a checkpoint: everything a resumed run needs to continue exactly."""
    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    if momentum_encoder is not None:
        state["moco"] = nnx.state(momentum_encoder)
    return state


def restore_train_state(state: dict, model, optimizer, momentum_encoder=None) -> None:
    """Puts a checkpoint's `state` item (from `checkpoint_state`'s template) into the objects."""
    nnx.update(model, state["model"])
    nnx.update(optimizer, state["optimizer"])
    if momentum_encoder is not None:
        nnx.update(momentum_encoder, state["moco"])
