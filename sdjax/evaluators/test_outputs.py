"""Test-set outputs for analyses past the summary metrics: per-label results, embedding plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdjax.evaluators.linear_probe import ProbeResult


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
