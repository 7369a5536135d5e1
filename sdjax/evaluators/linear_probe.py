"""Linear evaluation: a sigmoid-BCE linear classifier on frozen encoder features.

Results: "linear_eval", the test metrics of the probe of the evaluated model, and
"validation": {"linear_eval": ...}, its validation metrics, for each split that is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from sdjax import datasets, evaluators, input_pipeline, metrics, models
from sdjax.evaluators.common import EvalData
from sdjax.sharding import shard_global_batch


class ProbeResult(NamedTuple):
    """What `LinearProbe` returns for one scored split: its metrics, scores and features."""

    metrics: dict  # sdjax.metrics.multilabel_metrics of the scored split's scores
    scores: np.ndarray  # float32 [N, C], sigmoid outputs
    features: np.ndarray  # float32 [N, F], the frozen encoder's


@nnx.jit
def _encode(model, inputs):
    return models.evaluation_view(model).encode(inputs)


@nnx.jit
def _fit_step(classifier, optimizer, features, labels):
    def loss_fn(classifier):
        return optax.sigmoid_binary_cross_entropy(classifier(features), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(classifier)
    optimizer.update(classifier, grads)
    return loss


class LinearProbe:
    """`probe(model, train, scored) -> {split: ProbeResult}`, with `config.linear_eval`'s settings.

    One classifier is fitted on the training features and scores every split of `scored`
    ({split: arrays}, e.g. validation and test). Features are standardised with training
    statistics, which makes one learning rate fit every encoder. Every host computes the same
    probe on the gathered features.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        self._config = config
        self._mesh = mesh
        self._modality = datasets.modality_of(config)

    def features(self, model: nnx.Module, inputs: np.ndarray) -> np.ndarray:
        """Frozen encoder features of every example, on every host (numpy in, numpy out)."""
        batch_size = self._config.eval_batch_size
        features = []
        for start in range(0, len(inputs), batch_size):
            chunk = self._modality.model_inputs(inputs[start : start + batch_size])
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            encoded = _encode(model, shard_global_batch(chunk, self._mesh))
            gathered = multihost_utils.process_allgather(encoded, tiled=True)
            features.append(gathered[: batch_size - pad])
        return np.concatenate(features)

    def __call__(
        self, model: nnx.Module, train: dict[str, Any], scored: dict[str, dict[str, Any]]
    ) -> dict[str, ProbeResult]:
        train_features = self.features(model, train["inputs"])
        classify = self.fit(train_features, train["labels"])
        results = {}
        for split, examples in scored.items():
            features = self.features(model, examples["inputs"])
            scores = classify(features)
            scored = metrics.multilabel_metrics(scores, examples["labels"])
            results[split] = ProbeResult(scored, scores, features)
        return results

    def fit(
        self, train_features: np.ndarray, train_labels: np.ndarray
    ) -> Callable[[np.ndarray], np.ndarray]:
        """Fits the classifier on training features; returns `features [N, F] -> scores [N, C]`."""
        config, settings = self._config, self._config.linear_eval
        mean, std = standardisation(train_features)
        train_x = jnp.asarray((train_features - mean) / std)
        train_y = jnp.asarray(train_labels)
        classifier = models.LinearClassifier(
            train_x.shape[1], train_y.shape[1], rngs=nnx.Rngs(config.seed + 1)
        )
        schedule = optax.cosine_decay_schedule(settings.learning_rate, settings.num_steps)
        optimizer = nnx.Optimizer(
            classifier, optax.adamw(schedule, weight_decay=settings.weight_decay), wrt=nnx.Param
        )
        batch_size = min(settings.batch_size, len(train_x))
        for step in range(settings.num_steps):
            indices = input_pipeline.batch_indices(
                len(train_x), global_batch_size=batch_size, seed=config.seed + 1, step=step
            )
            _fit_step(classifier, optimizer, train_x[indices], train_y[indices])

        def classify(features):
            return np.asarray(jax.nn.sigmoid(classifier(jnp.asarray((features - mean) / std))))

        return classify


def standardisation(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probe's per-feature (mean, std) of the training features [N, F]: it fits and scores
    `(features - mean) / std`."""
    return train_features.mean(axis=0), train_features.std(axis=0) + 1e-6


def outcomes(model: nnx.Module, data: EvalData) -> dict[str, ProbeResult]:
    """`LinearProbe` of `model` on every scored split of `data`, computed once per evaluation
    (the joint classifier, the test outputs and the long tail use its features and scores)."""
    return data.once(
        ("linear_probe", id(model)),
        lambda: LinearProbe(data.config, data.mesh)(model, data.train, data.scored),
    )


def split_entries(name: str, metrics_by_split: dict[str, dict]) -> dict[str, Any]:
    """{name: test metrics, "validation": {name: validation metrics}}, as results.json holds
    them, for the splits that `metrics_by_split` has."""
    entries: dict[str, Any] = {}
    for split, split_metrics in metrics_by_split.items():
        if split == "test":
            entries[name] = split_metrics
        else:
            entries.setdefault(split, {})[name] = split_metrics
    return entries


class Evaluator(evaluators.Evaluator):
    """The linear probe of the evaluated model, with `config.linear_eval`'s settings."""

    def __init__(self, config: ml_collections.ConfigDict):
        del config  # `outcomes` reads the settings

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        probed = outcomes(model, data)
        return split_entries("linear_eval", {split: probed[split].metrics for split in probed})
