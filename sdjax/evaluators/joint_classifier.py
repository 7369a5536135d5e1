"""The classifier trained with the encoder (`method = "joint"`): end-to-end fine-tuning's scores."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from sdjax.sharding import replicate


@nnx.jit
def _scores(classifier, features):
    return jax.nn.sigmoid(classifier(features))


def joint_classifier_scores(
    model: nnx.Module, features: np.ndarray, mesh: jax.sharding.Mesh
) -> np.ndarray:
    """Sigmoid scores [N, C] of `model.classifier` on the encoder's features [N, F] of a split.

    The features are `LinearProbe`'s, gathered on every host, so the classifier sees exactly the
    features the linear probe is fitted on, unstandardised, as in training.
    """
    classifier = model.classifier  # type: ignore[attr-defined]  # a models.JointModel
    return np.asarray(_scores(classifier, replicate(features, mesh)))
