"""What stage 1 optimises and how: the loss of a global batch (views, encoder + head, the
configured loss) and the optimiser."""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections
import optax
from flax import nnx

from sdjax import input_pipeline, losses
from sdjax.sharding import BATCH_AXIS


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        decay_steps=config.num_train_steps,
    )


def create_optimizer(config: ml_collections.ConfigDict, model) -> nnx.Optimizer:
    """AdamW with linear warmup and cosine decay over the parameters of `model`."""
    return nnx.Optimizer(
        model,
        optax.adamw(learning_rate_schedule(config), weight_decay=config.optimizer.weight_decay),
        wrt=nnx.Param,
    )


def make_stage1_loss(config: ml_collections.ConfigDict, mesh) -> Callable:
    """`loss(model, inputs, labels, step)`: the stage-1 loss of a global batch on `mesh`.

    `config.method = "contrastive"` scores `num_views` augmented views per example with the
    loss family of `config.loss`; `"bce"` scores one view with sigmoid BCE.
    """
    modality = input_pipeline.DATASETS[config.dataset.name].modality
    base_key = jax.random.key(config.seed)
    num_views = config.num_views if config.method == "contrastive" else 1
    sharded_loss = losses.make_sharded_loss(
        mesh,
        BATCH_AXIS,
        positives=config.loss.positives,
        temperature=float(config.loss.temperature),
        jaccard_threshold=float(config.loss.jaccard_threshold),
        block_size=config.loss.block_size or None,
    )

    def loss_fn(model, inputs, labels, step):
        # Augmentations depend on (seed, step) only, so a resumed run sees the same views.
        views = modality.make_views(jax.random.fold_in(base_key, step), inputs, num_views)
        outputs = model(views.reshape((-1, *views.shape[2:])))
        if config.method == "bce":
            return optax.sigmoid_binary_cross_entropy(outputs, labels).mean()
        return sharded_loss(outputs.reshape((views.shape[0], num_views, -1)), labels)

    return loss_fn
