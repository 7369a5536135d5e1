"""The long-tail helpers against sklearn and against their definitions."""

import numpy as np
import sklearn.metrics

from sdjax import metrics


def random_problem(seed=0, n=300, c=12):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < np.linspace(0.02, 0.5, c)).astype(np.int64)
    scores = np.clip(0.5 * labels + rng.random((n, c)) * 0.8 - 0.2, 0, 1)
    return scores, labels


def test_per_label_metrics_match_sklearn():
    scores, labels = random_problem()
    labels[:, 0] = 0  # a label without positives
    ap = metrics.per_label_average_precision(scores, labels)
    assert np.isnan(ap[0])
    for j in range(1, labels.shape[1]):
        np.testing.assert_allclose(
            ap[j], sklearn.metrics.average_precision_score(labels[:, j], scores[:, j]), rtol=1e-12
        )
    f1 = metrics.per_label_f1(scores, labels)
    expected = sklearn.metrics.f1_score(labels, scores >= 0.5, average=None, zero_division=0)
    np.testing.assert_allclose(f1, expected, rtol=1e-12)


def test_frequency_groups_are_thirds_by_count():
    counts = np.array([5, 100, 7, 50, 1, 30, 2, 9, 60])
    groups = metrics.frequency_groups(counts)
    assert groups["head"].tolist() == [1, 3, 8]
    assert groups["medium"].tolist() == [2, 5, 7]
    assert sorted(groups["tail"].tolist()) == [0, 4, 6]


def test_bootstrap_point_estimate_and_paired_resamples():
    scores, labels = random_problem(1)
    groups = metrics.frequency_groups(labels.sum(axis=0))
    result = metrics.bootstrap_group_metrics(scores, labels, groups, num_resamples=50)
    head = groups["head"]
    assert len(result["head"]["mAP"]) == 51
    np.testing.assert_allclose(
        result["head"]["mAP"][0],
        sklearn.metrics.average_precision_score(labels[:, head], scores[:, head], average="macro"),
    )
    np.testing.assert_allclose(
        result["tail"]["macro_f1"][0],
        sklearn.metrics.f1_score(
            labels[:, groups["tail"]],
            scores[:, groups["tail"]] >= 0.5,
            average="macro",
            zero_division=0,
        ),
    )
    # Same seed, same resamples: a second call reproduces every replicate.
    again = metrics.bootstrap_group_metrics(scores, labels, groups, num_resamples=50)
    assert again == result
    replicates = np.array(result["head"]["mAP"][1:])
    assert replicates.std() > 0 and abs(replicates.mean() - result["head"]["mAP"][0]) < 0.05


def test_bootstrap_map_replicates_are_the_resampled_rows_map():
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 9)) < np.linspace(0.01, 0.4, 9)).astype(np.int64)
    scores = (0.4 * labels + rng.random((200, 9))).astype(np.float32)  # no ties
    replicates = metrics.bootstrap_mean_average_precision(scores, labels, num_resamples=30)
    assert replicates.shape == (31,)
    # Replicate 0 is the test set itself: the headline mAP, computed by sklearn.
    np.testing.assert_allclose(
        replicates[0], metrics.multilabel_metrics(scores, labels)["mAP"], rtol=1e-12
    )
    # Replicate r: bootstrap_group_metrics's resample r, rows copied and scored as they are.
    for r in range(30):
        rows = np.random.default_rng((0, r)).integers(0, 200, 200)
        expected = np.nanmean(metrics.per_label_average_precision(scores[rows], labels[rows]))
        np.testing.assert_allclose(replicates[1 + r], expected, rtol=1e-12)
