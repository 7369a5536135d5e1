"""The long tail: how the linear probe scores rare labels next to frequent ones, with intervals.

Results: "long_tail" {"train_label_counts": [C], "label_groups": {"head", "medium", "tail":
label indices}, "group_bootstrap": {group: {"macro_f1", "mAP": [test, resample 1, ...]}}}, from
the probe's float32 test scores (`sdjax.metrics.bootstrap_group_metrics`: 200 resamples of the
test examples, the same for every run on one test set, so runs pair); none without test.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from sdjax import evaluators, metrics
from sdjax.evaluators import linear_probe
from sdjax.evaluators.common import EvalData


class Evaluator(evaluators.Evaluator):
    """Label groups by training frequency, and each group's metrics on bootstrap resamples."""

    def __init__(self, config: ml_collections.ConfigDict):
        del config  # nothing to set

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        if "test" not in data.scored:
            return {}
        scores = linear_probe.outcomes(model, data)["test"].scores.astype(np.float32)
        train_label_counts = np.asarray(data.train["labels"]).sum(axis=0)
        groups = metrics.frequency_groups(train_label_counts)
        return {
            "long_tail": {
                "train_label_counts": train_label_counts.astype(int).tolist(),
                "label_groups": {group: members.tolist() for group, members in groups.items()},
                "group_bootstrap": metrics.bootstrap_group_metrics(
                    scores, data.scored["test"]["labels"], groups
                ),
            }
        }
