"""Multi-label metrics on held-out scores, from sklearn.metrics."""

from __future__ import annotations

import numpy as np
from sklearn import metrics


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Mean over samples with a label of (true labels among the top k scores) / k."""
    top_k = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(labels, top_k, axis=1).sum(axis=1)
    has_label = labels.sum(axis=1) > 0
    return float(np.mean(hits[has_label] / k)) if has_label.any() else float("nan")


def multilabel_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict:
    """Micro/macro F1 at `threshold`, mAP, micro/macro ROC-AUC and P@k.

    Args:
      scores: [N, C] probabilities (sigmoid outputs).
      labels: [N, C] multi-hot ground truth.
      threshold: decision threshold for F1.

    Returns:
      A flat dict of floats. Macro averages run over the classes that have both positive and
      negative test samples (AP and AUC are undefined otherwise); `num_scored_classes` says how
      many that is.
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(
            f"`scores`: got shape {scores.shape}, expected [N, C] matching `labels` {labels.shape}."
        )
    predictions = (scores >= threshold).astype(np.int64)
    positives_per_class = labels.sum(axis=0)
    scored = (positives_per_class > 0) & (positives_per_class < labels.shape[0])
    scored_labels, scored_scores = labels[:, scored], scores[:, scored]
    result = {
        "micro_f1": metrics.f1_score(labels, predictions, average="micro", zero_division=0),
        "macro_f1": metrics.f1_score(labels, predictions, average="macro", zero_division=0),
        "mAP": metrics.average_precision_score(scored_labels, scored_scores, average="macro"),
        "micro_auc": metrics.roc_auc_score(scored_labels, scored_scores, average="micro"),
        "macro_auc": metrics.roc_auc_score(scored_labels, scored_scores, average="macro"),
        "num_scored_classes": int(scored.sum()),
    }
    for k in (1, 3):
        if k <= labels.shape[1]:
            result[f"precision_at_{k}"] = precision_at_k(scores, labels, k)
    return {key: float(value) for key, value in result.items()}
