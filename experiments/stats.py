"""The statistics of the experiments: Holm's correction, the two-stage paired bootstrap, TOST.

Used by `experiments.experiment_report` (Holm) and `experiments.protocol_report` (all of it).
Each function is checked in tests/test_protocol.py against an independent computation.
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.multitest import multipletests


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of one family of p-values; NaN (no test) stays out of it."""
    tested = [i for i, p in enumerate(p_values) if not np.isnan(p)]
    adjusted = [float("nan")] * len(p_values)
    if tested:
        corrected = multipletests([p_values[i] for i in tested], method="holm")[1]
        for i, p in zip(tested, corrected, strict=True):
            adjusted[i] = float(p)
    return adjusted


def two_stage_bootstrap(a: np.ndarray, b: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Replicates of the seed-averaged difference a - b, resampling seeds, then test examples.

    Args:
      a, b: float [S, 1 + R], row s the run of seed s (the same seeds in both, so the runs
        pair: seed s of either saw the same data order), column 0 its test mAP and column
        1 + r its mAP on test resample r (the same resample for every run, so examples pair).
      seed: of the seed resampling.

    Returns:
      float64 [R]: replicate r draws S seeds with replacement and takes test resample r, and
      is the mean over the drawn seeds of a - b. Seeds and test examples are crossed (every
      seed is scored on the same test set), so each replicate draws both once.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"a, b: got shapes {a.shape} and {b.shape}, expected equal [S, 1 + R].")
    differences = a[:, 1:] - b[:, 1:]
    num_seeds, num_resamples = differences.shape
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, num_seeds, (num_resamples, num_seeds))
    return differences[drawn, np.arange(num_resamples)[:, None]].mean(axis=1)


def bootstrap_p_value(replicates: np.ndarray, null: float = 0.0) -> float:
    """Two-sided p of "the difference is `null`": twice the smaller tail at `null`, with the
    (1 + count) / (1 + R) correction, at most 1."""
    replicates = np.asarray(replicates)
    below = (1 + np.sum(replicates <= null)) / (1 + len(replicates))
    above = (1 + np.sum(replicates >= null)) / (1 + len(replicates))
    return float(min(1.0, 2 * min(below, above)))


def tost_p_value(replicates: np.ndarray, margin: float) -> float:
    """Two one-sided tests of equivalence within ±`margin` on a bootstrap distribution.

    H0: |difference| >= margin. Each one-sided p is the bootstrap tail beyond its bound, with
    the (1 + count) / (1 + R) correction; TOST's p is the larger. p < α is the same as the
    (1 - 2α) percentile interval lying inside (-margin, margin).
    """
    replicates = np.asarray(replicates)
    count = len(replicates)
    lower = (1 + np.sum(replicates <= -margin)) / (1 + count)
    upper = (1 + np.sum(replicates >= margin)) / (1 + count)
    return float(max(lower, upper))


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def verdict(effect: dict, margin: float, alpha: float) -> str:
    """The pre-registered reading of one contrast.

    `effect`: {"diff", "low", "high" (its 95% interval), "p_holm", "tost_p_holm"}. A difference
    is claimed only when the interval excludes 0, the Holm-corrected p < `alpha` and
    |diff| > `margin`; otherwise the entries are "practically equal" when the Holm-corrected
    TOST p < `alpha`, and "inconclusive" when neither holds.
    """
    excludes_zero = effect["low"] > 0 or effect["high"] < 0
    if excludes_zero and effect["p_holm"] < alpha and abs(effect["diff"]) > margin:
        return "better" if effect["diff"] > 0 else "worse"
    if effect["tost_p_holm"] < alpha:
        return "practically equal"
    return "inconclusive"
