"""Multi-label metrics on held-out scores, from sklearn.metrics."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score


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
        "micro_f1": f1_score(labels, predictions, average="micro", zero_division=0),
        "macro_f1": f1_score(labels, predictions, average="macro", zero_division=0),
        "mAP": average_precision_score(scored_labels, scored_scores, average="macro"),
        "micro_auc": roc_auc_score(scored_labels, scored_scores, average="micro"),
        "macro_auc": roc_auc_score(scored_labels, scored_scores, average="macro"),
        "num_scored_classes": int(scored.sum()),
    }
    for k in (1, 3):
        if k <= labels.shape[1]:
            result[f"precision_at_{k}"] = precision_at_k(scores, labels, k)
    return {key: float(value) for key, value in result.items()}


# --------------------------------------------------------------------------------------------
# Long-tail analysis: per-label metrics, frequency groups and bootstrap replicates
# --------------------------------------------------------------------------------------------


def per_label_average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every column at once: float64 [C], NaN for a column with no positive.

    Equal to `sklearn.metrics.average_precision_score` per column when scores have no ties
    (tied scores are ranked in index order here); vectorised because the bootstrap calls it
    hundreds of times on thousands of labels.
    """
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(np.asarray(labels, np.float64), order, axis=0)
    hits = np.cumsum(ranked, axis=0)
    precision = hits / np.arange(1, len(ranked) + 1)[:, None]
    num_positives = ranked.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_positives > 0, (precision * ranked).sum(axis=0) / num_positives, np.nan)


def per_label_f1(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """F1 of every column at `threshold`: float64 [C]; 0 where it is 0/0 (sklearn's default)."""
    predicted = scores >= threshold
    truth = np.asarray(labels) > 0
    true_positives = (predicted & truth).sum(axis=0)
    denominator = predicted.sum(axis=0) + truth.sum(axis=0)
    return np.where(denominator > 0, 2 * true_positives / np.maximum(denominator, 1), 0.0)


def frequency_groups(train_label_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Label indices split into head, medium and tail thirds by training frequency."""
    order = np.argsort(-np.asarray(train_label_counts), kind="stable")
    head, medium, tail = np.array_split(order, 3)
    return {"head": np.sort(head), "medium": np.sort(medium), "tail": np.sort(tail)}


def bootstrap_group_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    groups: dict[str, np.ndarray],
    *,
    num_resamples: int = 200,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Macro-F1 and mAP of each label group on the test set and on bootstrap resamples of it.

    Resample r draws test examples with `default_rng((seed, r))`, so two runs scored on the same
    test set see the same resamples and their replicates can be compared pairwise.

    Returns:
      {group: {"macro_f1": [point, r_1, ..., r_R], "mAP": [point, r_1, ...]}}; a group's mAP
      averages the labels that have a positive in that sample.
    """
    results: dict[str, dict[str, list[float]]] = {g: {"macro_f1": [], "mAP": []} for g in groups}
    num_examples = len(labels)
    samples = [np.arange(num_examples)] + [
        np.random.default_rng((seed, r)).integers(0, num_examples, num_examples)
        for r in range(num_resamples)
    ]
    for sample in samples:
        ap = per_label_average_precision(scores[sample], labels[sample])
        f1 = per_label_f1(scores[sample], labels[sample])
        for group, members in groups.items():
            results[group]["mAP"].append(float(np.nanmean(ap[members])))
            results[group]["macro_f1"].append(float(f1[members].mean()))
    return results


def bootstrap_mean_average_precision(
    scores: np.ndarray, labels: np.ndarray, *, num_resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """mAP on the test set and on bootstrap resamples of its examples: float64 [1 + R].

    Resample r draws the examples of `bootstrap_group_metrics`'s resample r, so every run
    scored on one test set sees the same resamples and replicates pair across runs. A resample
    is computed as example weights (how often each example was drawn) over one sort per label,
    which equals `per_label_average_precision` of the resampled rows when scores have no ties;
    a label without a positive in a resample is left out of its mean, as there.
    """
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels) > 0
    num_examples, num_labels = labels.shape
    order = np.argsort(-scores, axis=0, kind="stable")  # [N, C]: each label's ranking
    # The positives, label by label, each in its label's rank order.
    label_of, rank_of = np.nonzero(np.take_along_axis(labels, order, axis=0).T)
    first_of_label = np.searchsorted(label_of, np.arange(num_labels))
    replicates = np.empty(1 + num_resamples)
    for r in range(1 + num_resamples):
        if r == 0:
            weights = np.ones(num_examples, np.int32)
        else:
            sample = np.random.default_rng((seed, r - 1)).integers(0, num_examples, num_examples)
            weights = np.bincount(sample, minlength=num_examples).astype(np.int32)
        ranked = weights[order]  # copies of each example, in each label's order
        copies = ranked[rank_of, label_of]  # of each positive
        copies_before = np.cumsum(ranked, axis=0)[rank_of, label_of] - copies
        running = np.cumsum(copies)
        hits_before = running - copies - (running - copies)[first_of_label[label_of]]
        # The j-th copy of a positive example has precision (hits before + j) / (rank + j).
        precision_sum = np.zeros(len(copies))
        for j in range(1, int(copies.max(initial=0)) + 1):
            term = (hits_before + j) / (copies_before + j)
            precision_sum += np.where(copies >= j, term, 0.0)
        positives = np.bincount(label_of, weights=copies, minlength=num_labels)
        sums = np.bincount(label_of, weights=precision_sum, minlength=num_labels)
        replicates[r] = np.mean(sums[positives > 0] / positives[positives > 0])
    return replicates
