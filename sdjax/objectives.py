"""What stage 1 optimises: the method (the model and its loss) and the framework (the contrast
set), each chosen by name from the config; the optimiser; the augmented views.

`config.method` picks the model and the loss of its outputs: `"contrastive"` (encoder +
projection head, the loss family of `config.loss`), `"bce"` (encoder + linear classifier,
sigmoid BCE: the supervised baseline) or `"joint"` (both heads: the BCE of a linear classifier
on the encoder plus `config.loss.joint_weight` times the contrastive loss).

`config.framework` picks the contrast set: `"in_batch"` contrasts every view with every other
view of the global batch; `"moco"` contrasts the queries (view 0, the trained encoder) with keys
(view 1, through a momentum copy of encoder and head) of this batch plus a FIFO queue of earlier
keys and their labels (the query/key form of docs/SPEC.md).

A method's loss is a function of the model's outputs for every encoder input of the step (the
framework says which inputs those are), so gradient caching (`sdjax.gradient_cache`) can run
the model chunk by chunk for every (method, framework) pair. `sdjax.recipe` puts them together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import datasets, losses, models
from sdjax.sharding import BATCH_AXIS

# --------------------------------------------------------------------------------------------
# The losses' contrast set: the one place that calls into sdjax.losses
# --------------------------------------------------------------------------------------------


def _sharded_loss(config: ml_collections.ConfigDict, mesh) -> Callable:
    return losses.make_sharded_loss(
        mesh,
        BATCH_AXIS,
        positives=config.loss.positives,
        temperature=float(config.loss.temperature),
        jaccard_threshold=float(config.loss.jaccard_threshold),
        block_size=config.loss.block_size or None,
        exchange=config.loss.exchange,
    )


Contrast = losses.Keys  # the loss's contrast set


def contrast_set(features, labels, mask, sample_ids) -> Contrast:
    """The loss's keys (`sdjax.losses.Keys`) from their four arrays."""
    return losses.Keys(features=features, labels=labels, mask=mask, sample_ids=sample_ids)


def batch_keys(keys: jax.Array, labels: jax.Array) -> Contrast:
    """The loss's keys for one batch's keys alone: key n is a view of global sample n."""
    return contrast_set(
        keys,
        labels.astype(jnp.float32),
        jnp.ones(keys.shape[:1], bool),
        jnp.arange(keys.shape[0], dtype=jnp.int32),
    )


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean()


# --------------------------------------------------------------------------------------------
# Methods: the model and the loss of its outputs
# --------------------------------------------------------------------------------------------

ContrastiveLoss = Callable[[jax.Array], jax.Array]  # embeddings -> the framework's loss


class Contrastive:
    """`method = "contrastive"`: encoder + projection head; the loss of `config.loss`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.num_views = config.num_views  # views per example that the step draws

    def create_model(self, num_classes: int) -> models.ContrastiveModel:
        return models.create_model(self.config, num_classes, self.config.seed)

    def outputs(self, model: nnx.Module, inputs: jax.Array) -> Any:
        """The model's outputs for encoder inputs [M, ...]: each row depends on its input only."""
        return model(inputs)

    def loss(self, outputs, input_labels: jax.Array, contrastive: ContrastiveLoss) -> jax.Array:
        """The loss of `outputs`, given each input's labels and the contrastive loss."""
        del input_labels
        return contrastive(outputs)


class BCE(Contrastive):
    """`method = "bce"`: encoder + linear classifier, sigmoid BCE on one view per example."""

    def __init__(self, config):
        super().__init__(config)
        self.num_views = 1

    def create_model(self, num_classes: int) -> models.ContrastiveModel:
        return models.create_model(self.config, num_classes, self.config.seed, classifier_head=True)

    def loss(self, outputs, input_labels, contrastive):
        return _bce(outputs, input_labels)


class Joint(Contrastive):
    """`method = "joint"`: the BCE of a linear classifier on the encoder features of the inputs
    the loss sees (all views in-batch, the queries with MoCo) plus `loss.joint_weight` times the
    contrastive loss of the projection head's embeddings."""

    def create_model(self, num_classes: int) -> models.ContrastiveModel:
        model = super().create_model(num_classes)
        classifier = models.LinearClassifier(
            model.encoder.features_dim,  # type: ignore[attr-defined]  # every encoder has it
            num_classes,
            rngs=nnx.Rngs(self.config.seed + 2),
        )  # seed + 1 is the linear probe's
        return models.JointModel(model.encoder, model.head, classifier)

    def outputs(self, model, inputs):
        features = model.encode(inputs)
        return {"embeddings": model.head(features), "logits": model.classifier(features)}

    def loss(self, outputs, input_labels, contrastive):
        contrastive_loss = contrastive(outputs["embeddings"])
        bce = _bce(outputs["logits"], input_labels)
        return bce + self.config.loss.joint_weight * contrastive_loss


METHODS: dict[str, type[Contrastive]] = {"contrastive": Contrastive, "bce": BCE, "joint": Joint}


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    """The stage-1 model of `config.method` (unplaced: its parameters on the default device)."""
    return METHODS[config.method](config).create_model(num_classes)


# --------------------------------------------------------------------------------------------
# Frameworks: the encoder inputs of a step, the contrast set, and their state
# --------------------------------------------------------------------------------------------


class InBatch:
    """`framework = "in_batch"`: every view of the global batch is an encoder input, and the
    contrast set is the batch itself. No state beyond the model and optimiser."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config = config
        self.sharded_loss = _sharded_loss(config, mesh)

    def model_inputs(self, views: jax.Array) -> jax.Array:
        """[B, V, ...] views -> [B * V, ...], each example's V views adjacent."""
        return views.reshape((-1, *views.shape[2:]))

    def input_labels(self, labels: jax.Array, num_views: int) -> jax.Array:
        """The labels of each encoder input: [B * V, C]."""
        return labels if num_views == 1 else jnp.repeat(labels, num_views, axis=0)

    def contrastive_loss(self, embeddings, labels, contrast) -> jax.Array:
        """The loss of the [B * V, D] embeddings (`contrast` is None: the batch is the set)."""
        del contrast
        return self.sharded_loss(
            embeddings.reshape((labels.shape[0], -1, embeddings.shape[-1])), labels
        )

    def create_state(self, model, num_classes: int, mesh) -> models.MomentumEncoder | None:
        """The framework's own train state (placed on `mesh`): none in-batch."""
        return None

    def before_step(self, state, views, labels) -> tuple[Contrast | None, Any]:
        """(the contrast set, what `after_step` needs): nothing in-batch."""
        return None, None

    def after_step(self, state, pending) -> None:
        pass

    def heldout_contrast(self, model, views, labels) -> Contrast | None:
        """The contrast set of the loss without a train state: the batch itself in-batch."""
        return None


class MoCo(InBatch):
    """`framework = "moco"`: the queries (view 0) are the encoder inputs; the contrast set is
    view 1 of the batch through the `MomentumEncoder` (the keys), then its queue.

    A step runs MoCo's order: the EMA step, the keys of view 1, the loss of the queries against
    those keys and the queue, the gradient step (the recipe's), then keys and labels enqueued.
    """

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.queue_sharding = NamedSharding(mesh, P(BATCH_AXIS))

    def model_inputs(self, views):
        return views[:, 0]

    def input_labels(self, labels, num_views):
        return labels

    def contrastive_loss(self, embeddings, labels, contrast):
        return self.sharded_loss(embeddings, labels, keys=contrast)

    def create_state(self, model, num_classes, mesh) -> models.MomentumEncoder:
        """The momentum encoder, placed on `mesh`: its copy of the model replicated, the queue's
        rows split over the devices like a batch (its pointer, a scalar, replicated)."""
        encoder = models.MomentumEncoder(
            model, queue_size=self.config.moco.queue_size, num_classes=num_classes
        )
        # Its own buffers, not the model's (a clone shares them): the train step donates both.
        copies = jax.device_put(
            nnx.state(encoder, nnx.Not(models.QueueState)), _replicated(mesh), may_alias=False
        )
        nnx.update(encoder, copies)
        queue = nnx.state(encoder, models.QueueState)

        def place(x):  # the pointer is a scalar: replicated
            return jax.device_put(x, self.queue_sharding if x.ndim else _replicated(mesh))

        nnx.update(encoder, jax.tree.map(place, queue))
        return encoder

    def before_step(self, state, views, labels):
        encoder = state.momentum_encoder
        encoder.follow(state.model, self.config.moco.momentum)
        keys = encoder(views[:, 1])
        return self.contrast_with_queue(encoder, keys, labels), (keys, labels)

    def after_step(self, state, pending):
        state.momentum_encoder.enqueue(*pending, self.queue_sharding)

    def heldout_contrast(self, model, views, labels):
        """Without a queue: the queries' own samples' view-1 keys through `model` itself."""
        return batch_keys(jax.lax.stop_gradient(model(views[:, 1])), labels)

    @staticmethod
    def contrast_with_queue(encoder: models.MomentumEncoder, keys, labels) -> Contrast:
        """This batch's keys (each a view of its own sample), then the queue."""
        queue_size = encoder.queue.value.shape[0]
        return contrast_set(
            jnp.concatenate([keys, encoder.queue.value]),
            jnp.concatenate([labels.astype(jnp.float32), encoder.queue_labels.value]),
            jnp.concatenate([jnp.ones(keys.shape[:1], bool), encoder.queue_valid.value]),
            jnp.concatenate(
                [
                    jnp.arange(keys.shape[0], dtype=jnp.int32),  # as `batch_keys` numbers them
                    jnp.full((queue_size,), -1, jnp.int32),
                ]
            ),
        )


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


FRAMEWORKS: dict[str, type[InBatch]] = {"in_batch": InBatch, "moco": MoCo}


# --------------------------------------------------------------------------------------------
# The optimiser and the views
# --------------------------------------------------------------------------------------------


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


def create_optimizer(
    config: ml_collections.ConfigDict, model, *, decay_mask: Callable | None = None
) -> nnx.Optimizer:
    """AdamW with linear warmup and cosine decay over the parameters of `model`.

    With `config.optimizer.decay_only_matrices`, weight decay skips parameters of fewer than two
    dimensions: biases, normalisation scales and per-token weights. For a `JointModel` with
    `optimizer.classifier_learning_rate` > 0, the classifier's updates are scaled to that peak
    learning rate (AdamW's update, decay included, is proportional to the learning rate).

    Args:
      config: the run's config; `config.optimizer` holds the rates, warm-up and decay.
      model: the model whose `nnx.Param`s are optimised.
      decay_mask: a function of the parameters to a tree of booleans, True where weight decay
        applies (for example `matrix_parameters`); it replaces the config's
        `decay_only_matrices` choice. None: that choice.

    Returns:
      The `nnx.Optimizer` over `model`'s parameters.
    """
    if decay_mask is None and config.optimizer.get("decay_only_matrices", False):
        decay_mask = matrix_parameters  # the field is absent in older configs
    transform = optax.adamw(
        learning_rate_schedule(config),
        weight_decay=config.optimizer.weight_decay,
        mask=decay_mask,
    )
    classifier_rate = config.optimizer.get("classifier_learning_rate", 0.0)
    if isinstance(model, models.JointModel) and classifier_rate:
        ratio = classifier_rate / config.optimizer.learning_rate
        transform = optax.chain(transform, optax.masked(optax.scale(ratio), classifier_parameters))
    return nnx.Optimizer(model, transform, wrt=nnx.Param)


def classifier_parameters(params):
    """A mask of `params`: True for the joint classifier's parameters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[0], "key", None) == "classifier", params
    )


def make_views_fn(config: ml_collections.ConfigDict, num_views: int) -> Callable:
    """`views(inputs, step) -> [B, num_views, ...]`: the step's augmented views, a pure function
    of (seed, step), so a resumed run sees the same views."""
    modality = datasets.modality_of(config)
    base_key = jax.random.key(config.seed)

    def views(inputs, step):
        return modality.make_views(jax.random.fold_in(base_key, step), inputs, num_views)

    return views
