"""Test-set outputs for analyses past the summary metrics: per-label results, embedding plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sdjax.evaluators.linear_probe import ProbeResult


def save_test_outputs(path: Path, probe: ProbeResult, train: dict, test: dict) -> None:
    """Writes features and scores (float16), labels (uint8) and training label counts."""
    np.savez_compressed(
        path,
        features=probe.test_features.astype(np.float16),
        scores=probe.scores.astype(np.float16),
        labels=test["labels"].astype(np.uint8),
        train_label_counts=train["labels"].sum(axis=0),
    )
