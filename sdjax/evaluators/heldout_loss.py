"""The stage-1 loss of a fixed held-out batch: comparable before and after training.

Results: "heldout_stage1_loss" {"initial", "final"}, the loss of the model before training and
of the evaluated one, and "heldout_split", the split whose first examples make the batch.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sdjax import datasets, evaluators, models
from sdjax.evaluators.common import EvalData
from sdjax.recipe import Recipe
from sdjax.sharding import shard_global_batch

HELDOUT_STEP = -1  # the views' (seed, step) key: no training step uses it


class HeldoutLoss:
    """`heldout(model) -> float`: the loss on the first held-out examples (the validation split
    when there is one, else test), always with the same views.

    Dropout is off (models.evaluation_view): its masks would advance from call to call. The
    batch is the training batch size (or the held-out split, if smaller), cut to a multiple of the
    devices, so the loss is the one training minimises.
    """

    def __init__(
        self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, examples: dict[str, Any]
    ):
        modality = datasets.modality_of(config)
        size = min(
            config.batch_size, len(examples["labels"]) // jax.device_count() * jax.device_count()
        )
        self._batch = (
            shard_global_batch(modality.model_inputs(examples["inputs"][:size]), mesh),
            shard_global_batch(np.asarray(examples["labels"][:size]), mesh),
        )
        self._loss = nnx.jit(Recipe(config, mesh).loss)

    def __call__(self, model: nnx.Module) -> float:
        return float(self._loss(models.evaluation_view(model), *self._batch, HELDOUT_STEP))


class Evaluator(evaluators.Evaluator):
    """`HeldoutLoss` of the initial and the evaluated model, on the validation split when there
    is one, else test."""

    def __init__(self, config: ml_collections.ConfigDict):
        self._config = config

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        split = next(iter(data.scored))
        heldout = HeldoutLoss(self._config, data.mesh, data.scored[split])
        return {
            "heldout_stage1_loss": {
                "initial": heldout(data.initial_model()),
                "final": heldout(model),
            },
            "heldout_split": split,
        }
