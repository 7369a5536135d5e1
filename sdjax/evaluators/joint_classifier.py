"""The classifier trained with the encoder (`method = "joint"`): end-to-end fine-tuning's scores.

Results: "classifier" (and "validation": {"classifier": ...}), the metrics of the model's own
classifier, with the same keys as "linear_eval"; none for a model without one.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sdjax import evaluators, metrics
from sdjax.evaluators import linear_probe
from sdjax.evaluators.common import EvalData
from sdjax.sharding import replicate


@nnx.jit
def _sigmoid_scores(classifier, features):
    return jax.nn.sigmoid(classifier(features))


def joint_classifier_scores(
    model: nnx.Module, features: np.ndarray, mesh: jax.sharding.Mesh
) -> np.ndarray:
    """Sigmoid scores [N, C] of `model.classifier` on the encoder's features [N, F] of a split.

    The features are `LinearProbe`'s, gathered on every host, so the classifier sees exactly the
    features the linear probe is fitted on, unstandardised, as in training.
    """
    classifier = model.classifier  # type: ignore[attr-defined]  # a models.JointModel
    return np.asarray(_sigmoid_scores(classifier, replicate(features, mesh)))


def scores(model: nnx.Module, data: EvalData, split: str) -> np.ndarray | None:
    """`joint_classifier_scores` of a scored split, computed once per evaluation; None for a
    model trained without a classifier of its own."""
    return _scores(model, data, split) if hasattr(model, "classifier") else None


def _scores(model: nnx.Module, data: EvalData, split: str) -> np.ndarray:
    return data.once(
        ("joint_classifier", id(model), split),
        lambda: joint_classifier_scores(
            model, linear_probe.outcomes(model, data)[split].features, data.mesh
        ),
    )


class Evaluator(evaluators.Evaluator):
    """The metrics of the jointly trained classifier on every scored split."""

    def __init__(self, config: ml_collections.ConfigDict):
        del config  # a model has its classifier or not, whatever the config

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        if not hasattr(model, "classifier"):
            return {}
        return linear_probe.split_entries(
            "classifier",
            {
                split: metrics.multilabel_metrics(_scores(model, data, split), examples["labels"])
                for split, examples in data.scored.items()
            },
        )
