"""Test-set outputs for analyses past the summary metrics: per-label results, embedding plots.

Results: none; writes `output_dir/test_outputs.npz` when test is scored and there is an output
directory (on the chief host of a multi-host run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from sdjax import evaluators
from sdjax.evaluators import joint_classifier, linear_probe
from sdjax.evaluators.common import EvalData
from sdjax.evaluators.linear_probe import ProbeResult

#: The file written into the output directory.
FILE_NAME = "test_outputs.npz"


def save_test_outputs(
    path: Path,
    probe: ProbeResult,
    train: dict,
    test: dict,
    classifier_scores: np.ndarray | None = None,
) -> None:
    """Writes features (float16), the probe's scores (float32), labels (uint8), training label
    counts and, for a joint run, its classifier's scores (float32).

    Scores stay float32 so that metrics recomputed from the file (bootstrap replicates) are
    the run's own; float16 ties and rounds scores, which moves AP.
    """
    extra = {} if classifier_scores is None else {"classifier_scores": classifier_scores}
    np.savez_compressed(
        path,
        features=probe.features.astype(np.float16),
        scores=probe.scores.astype(np.float32),
        labels=test["labels"].astype(np.uint8),
        train_label_counts=train["labels"].sum(axis=0),
        **{key: value.astype(np.float32) for key, value in extra.items()},  # type: ignore[arg-type]
    )


class Evaluator(evaluators.Evaluator):
    """`save_test_outputs` of the evaluated model's linear probe (and joint classifier)."""

    def __init__(self, config: ml_collections.ConfigDict):
        del config  # nothing to set

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        if "test" not in data.scored or data.output_dir is None:
            return {}
        # Every host computes (the probe gathers features across hosts); the chief writes.
        probe = linear_probe.outcomes(model, data)["test"]
        classifier_scores = joint_classifier.scores(model, data, "test")
        if jax.process_index() == 0:
            test = data.scored["test"]
            path = data.output_dir / FILE_NAME
            save_test_outputs(path, probe, data.train, test, classifier_scores)
        return {}
