"""The training recipe: one object, built from the config, that the trainer calls.

`Recipe(config, mesh)` puts together the method (`config.method`: the model and the loss of its
outputs) and the framework (`config.framework`: the encoder inputs of a step, the contrast set
and its state) of `sdjax.objectives`. It owns how the model is built, the train state, the loss
of a global batch, the train step with its after-step work (MoCo's EMA step and enqueue), and
what a checkpoint holds. Every (method, framework) pair takes the same path, gradient caching
(`config.embedding_chunk_size`) included.

Data parallelism: batches are sharded along the mesh's one axis, parameters are replicated, and
the loss gathers the contrast set across devices, so it is the loss of the global batch;
`jax.grad` is taken outside the loss's `shard_map`, which makes the gradient exactly the
single-device gradient of that global batch.
"""

import flax
import jax
import ml_collections
from clu import metrics
from flax import nnx

from sdjax import gradient_cache, models, objectives
from sdjax.sharding import replicate


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """What the training loop logs: the interval mean of the loss, and the learning rate."""

    # clu's idiom: the field's type is the metric class (a call that mypy cannot read as a type).
    loss: metrics.Average.from_output("loss")  # type: ignore[valid-type]
    learning_rate: metrics.LastValue.from_output("learning_rate")  # type: ignore[valid-type]


class TrainState(nnx.Module):
    """Everything a training step changes: the model, its optimiser and, with MoCo, the
    momentum encoder and its queue (None otherwise). Updated in place by `Recipe.train_step`."""

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        momentum_encoder: models.MomentumEncoder | None = None,
    ):
        self.model = model
        self.optimizer = optimizer
        self.momentum_encoder = momentum_encoder


class Recipe:
    """Stage 1 of `config`'s (method, framework) pair on `mesh`.

    Attributes:
      train_step: `train_step(state, inputs, labels, step) -> TrainMetrics`, jitted, on a
        sharded global batch; it updates the `TrainState` in place (and donates its buffers).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.method = objectives.METHODS[config.method](config)
        self.framework = objectives.FRAMEWORKS[config.framework](config, mesh)
        self.views = objectives.make_views_fn(config, self.method.num_views)
        self.schedule = objectives.learning_rate_schedule(config)
        self.chunk_size = config.embedding_chunk_size
        self.train_step = nnx.jit(self._train_step, donate_argnums=0)

    def create_model(self, num_classes: int) -> nnx.Module:
        """The stage-1 model, its parameters replicated over the mesh."""
        model = self.method.create_model(num_classes)
        nnx.update(model, replicate(nnx.state(model), self.mesh))
        return model

    def create_state(self, num_classes: int) -> TrainState:
        """A fresh train state on the mesh: parameters and optimiser state replicated, a MoCo
        queue sharded along the batch axis."""
        model = self.create_model(num_classes)
        optimizer = objectives.create_optimizer(self.config, model)
        nnx.update(optimizer, replicate(nnx.state(optimizer), self.mesh))
        extra = self.framework.create_state(model, num_classes, self.mesh)
        return TrainState(model, optimizer, extra)

    def loss(self, model: nnx.Module, inputs, labels, step) -> jax.Array:
        """The stage-1 loss of a global batch at `step`'s views, without a train state: MoCo
        contrasts the queries with their own samples' keys through `model` (no queue)."""
        views = self.views(inputs, step)
        contrast = self.framework.heldout_contrast(model, views, labels)
        inputs = self.framework.model_inputs(views)
        return self.loss_of_outputs(self.method.outputs(model, inputs), labels, contrast)

    def loss_of_outputs(self, outputs, labels, contrast) -> jax.Array:
        """The loss of the model's outputs for the step's encoder inputs: the one loss path."""
        contrastive = lambda embeddings: self.framework.contrastive_loss(
            embeddings, labels, contrast
        )
        input_labels = self.framework.input_labels(labels, self.method.num_views)
        return self.method.loss(outputs, input_labels, contrastive)

    def value_and_grad(self, model, inputs, labels, contrast):
        """`(loss, grads)` of the model's parameters on the step's encoder inputs, chunk by chunk
        when `config.embedding_chunk_size` is set (`sdjax.gradient_cache`)."""

        def loss_of_outputs(outputs):
            return self.loss_of_outputs(outputs, labels, contrast)

        if self.chunk_size:
            return gradient_cache.chunked_value_and_grad(
                model, inputs, loss_of_outputs, self.chunk_size, self.method.outputs
            )
        plain_loss = lambda model: loss_of_outputs(self.method.outputs(model, inputs))
        return nnx.value_and_grad(plain_loss)(model)

    def _train_step(self, state: TrainState, inputs, labels, step) -> TrainMetrics:
        views = self.views(inputs, step)
        contrast, pending = self.framework.before_step(state, views, labels)
        loss, grads = self.value_and_grad(
            state.model, self.framework.model_inputs(views), labels, contrast
        )
        state.optimizer.update(state.model, grads)
        self.framework.after_step(state, pending)
        return TrainMetrics.single_from_model_output(loss=loss, learning_rate=self.schedule(step))

    @staticmethod
    def checkpoint(state: TrainState) -> dict:
        """The `state` item of a checkpoint: everything a resumed run needs to continue exactly.
        (MoCo's is under "moco", the name checkpoints have always used.)"""
        items = {"model": nnx.state(state.model), "optimizer": nnx.state(state.optimizer)}
        if state.momentum_encoder is not None:
            items["moco"] = nnx.state(state.momentum_encoder)
        return items

    @staticmethod
    def restore(state: TrainState, checkpoint: dict) -> None:
        """Puts a checkpoint's `state` item (shaped like `checkpoint(state)`) into `state`."""
        nnx.update(state.model, checkpoint["model"])
        nnx.update(state.optimizer, checkpoint["optimizer"])
        if state.momentum_encoder is not None:
            nnx.update(state.momentum_encoder, checkpoint["moco"])
