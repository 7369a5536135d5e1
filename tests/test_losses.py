"""sdjax.losses against the float64 loop oracle of docs/SPEC.md, and its contract at the edges."""

import itertools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import oracle, supcon_l_out

from sdjax import losses


def random_case(seed, num_samples=7, num_views=2, dim=5, num_classes=4, masked=True):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, num_views, dim)).astype(np.float32)
    labels = (rng.random((num_samples, num_classes)) < 0.4).astype(np.float32)
    labels[0] = 0.0  # always one sample without labels
    mask = rng.random(num_samples) < 0.8 if masked else np.ones(num_samples, bool)
    mask[:2] = True
    label_weights = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    return features, labels, mask, label_weights


CASES = [
    # (seed, N, V, C, temperature, use_mask, use_label_weights)
    (0, 7, 2, 4, 0.1, True, False),
    (1, 9, 1, 5, 0.5, False, True),
    (2, 6, 3, 3, 0.07, True, True),
    (3, 11, 2, 6, 1.0, True, False),
]


@pytest.mark.parametrize("positives", losses.POSITIVES)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_loop_oracle(positives, case):
    seed, n, v, c, temperature, use_mask, use_weights = case
    features, labels, mask, label_weights = random_case(seed, n, v, 5, c)
    kwargs = dict(
        positives=positives,
        temperature=temperature,
        sample_mask=mask if use_mask else None,
        label_weights=label_weights if use_weights else None,
        jaccard_threshold=0.3,
    )
    want, want_per_anchor, want_anchor_weights = oracle(features, labels, **kwargs)
    got = losses.multilabel_supcon_loss(features, labels, **kwargs)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    per_anchor = losses.per_anchor_losses(features, labels, **kwargs)
    np.testing.assert_allclose(per_anchor.losses, want_per_anchor, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(per_anchor.anchor_weights, want_anchor_weights)
    np.testing.assert_array_equal(per_anchor.has_positive, want_anchor_weights > 0)
    np.testing.assert_allclose(losses.reduce_per_anchor(per_anchor), want, rtol=2e-5, atol=1e-6)
    assert want > 0  # every case has positives, so the comparison means something


def finite_difference_grad(features, labels, kwargs, eps=1e-4):
    features = np.asarray(features, np.float64)
    grad = np.zeros_like(features)
    for index in itertools.product(*map(range, features.shape)):
        plus, minus = features.copy(), features.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (oracle(plus, labels, **kwargs)[0] - oracle(minus, labels, **kwargs)[0]) / (
            2 * eps
        )
    return grad


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_gradient_matches_finite_differences_of_the_oracle(positives):
    features, labels, mask, label_weights = random_case(5, num_samples=5, num_views=2, dim=3)
    kwargs = dict(
        positives=positives,
        temperature=0.5,
        sample_mask=mask,
        label_weights=label_weights,
        jaccard_threshold=0.3,
    )
    want = finite_difference_grad(features, labels, kwargs)
    for block_size in (None, 3):  # 3 does not divide the 10 views
        got = jax.grad(
            lambda f, b=block_size: losses.multilabel_supcon_loss(f, labels, block_size=b, **kwargs)
        )(features)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-5)
    dense = jax.grad(
        lambda f: losses.reduce_per_anchor(losses.per_anchor_losses(f, labels, **kwargs))
    )(features)
    np.testing.assert_allclose(dense, want, rtol=2e-3, atol=2e-5)
    assert np.abs(want).max() > 1e-2


@pytest.mark.parametrize("positives", losses.POSITIVES)
@pytest.mark.parametrize("block_size", [1, 4, 7, 64])
def test_blockwise_equals_dense(positives, block_size):
    features, labels, mask, label_weights = random_case(11, num_samples=13, num_views=2, dim=8)
    kwargs = dict(positives=positives, sample_mask=mask, label_weights=label_weights)
    dense_value, dense_grad = jax.value_and_grad(
        lambda f: losses.reduce_per_anchor(losses.per_anchor_losses(f, labels, **kwargs))
    )(features)
    value, grad = jax.value_and_grad(
        lambda f: losses.multilabel_supcon_loss(f, labels, block_size=block_size, **kwargs)
    )(features)
    np.testing.assert_allclose(value, dense_value, rtol=1e-5)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-4, atol=1e-6)


WORKED_WEIGHTS = [
    # anchor, other, relation, K_s, K_d, w (docs/SPEC.md's table; labels 1..5 as columns 0..4)
    ({1, 2, 3}, {1, 2, 3}, losses.Relation.IDENTICAL, 1, 1, 1),
    ({1, 2, 3}, {1, 2}, losses.Relation.SUBSET, 2 / 3, 1, 2 / 3),
    ({1, 2}, {1, 2, 3}, losses.Relation.SUPERSET, 1, 1 / 2, 1 / 2),
    ({1, 2, 3}, {2, 3, 4, 5}, losses.Relation.OVERLAP, 2 / 3, 1 / 3, 2 / 9),
    ({1, 2, 3}, {4}, losses.Relation.DISJOINT, 0, 0, 0),
]


def multi_hot(*sets, num_classes=5):
    return np.array([[1.0 if k + 1 in s else 0.0 for k in range(num_classes)] for s in sets])


@pytest.mark.parametrize(("anchor", "other", "relation", "k_s", "k_d", "w"), WORKED_WEIGHTS)
def test_worked_weights_table(anchor, other, relation, k_s, k_d, w):
    labels = multi_hot(anchor, other)
    assert int(losses.label_relations(labels)[0, 1]) == relation
    for positives, expected in (
        ("sd", w),
        ("sd_similarity_only", k_s),
        ("sd_dissimilarity_only", k_d),
    ):
        weights = losses.pair_weights(labels, positives=positives)
        np.testing.assert_allclose(weights[0, 1], expected, rtol=1e-6)
        assert weights[0, 0] == 0


def test_relations_cover_every_case_and_empty_sets():
    labels = multi_hot({1, 2}, {1, 2}, {1}, {1, 2, 3}, {2, 4}, {5}, set())
    codes = np.asarray(losses.label_relations(labels))
    r = losses.Relation
    assert codes[0].tolist() == [
        r.IDENTICAL,
        r.IDENTICAL,
        r.SUBSET,
        r.SUPERSET,
        r.OVERLAP,
        r.DISJOINT,
        r.DISJOINT,
    ]
    assert codes[6, 6] == r.DISJOINT  # an empty set shares nothing, not even with itself


def test_pair_weights_count_same_sample_views_and_padding():
    labels = multi_hot({1, 2}, {2, 3}, set(), {1})
    weights = np.asarray(
        losses.pair_weights(labels, num_views=2, sample_mask=np.array([1, 1, 1, 0], bool))
    )
    assert weights.shape == (8, 8)
    np.testing.assert_array_equal(np.diag(weights), 0)
    # Views 4 and 5 (the unlabelled sample) are each other's only positive, with weight 1.
    assert weights[4, 5] == weights[5, 4] == 1 and weights[4].sum() == 1
    np.testing.assert_array_equal(weights[:, 6:], 0)  # padding is never a candidate
    np.testing.assert_array_equal(weights[6:], 0)  # nor an anchor
    np.testing.assert_allclose(weights[0, 2], (1 / 2) * (1 / 2))  # {1,2} vs {2,3}


def test_mulsupcon_pair_weights_are_per_label_normalised():
    labels = multi_hot({1, 2}, {1}, {1, 2}, {2})
    weights = np.asarray(losses.pair_weights(labels, positives="mulsupcon"))
    # Anchor 0: label 1 is carried by samples 1, 2; label 2 by samples 2, 3.
    np.testing.assert_allclose(weights[0], [0, 1 / 2, 1 / 2 + 1 / 2, 1 / 2])


@pytest.mark.parametrize("positives", ["sd", "all", "any"])
def test_class_ids_equal_one_hot_and_supcon(positives):
    rng = np.random.default_rng(3)
    class_ids = np.array([0, 1, 2, 0, 1, 2, 0, 3])
    features = rng.normal(size=(8, 2, 6)).astype(np.float32)
    one_hot = np.eye(4, dtype=np.float32)[class_ids]
    from_ids = losses.multilabel_supcon_loss(features, class_ids, positives=positives)
    from_one_hot = losses.multilabel_supcon_loss(features, one_hot, positives=positives)
    np.testing.assert_allclose(from_ids, from_one_hot, rtol=1e-6)
    np.testing.assert_allclose(from_ids, supcon_l_out(features, class_ids, 0.07), rtol=1e-5)
    grad_ids = jax.grad(lambda f: losses.multilabel_supcon_loss(f, class_ids))(features)
    grad_hot = jax.grad(lambda f: losses.multilabel_supcon_loss(f, one_hot))(features)
    np.testing.assert_allclose(grad_ids, grad_hot, rtol=1e-5, atol=1e-7)


def test_class_ids_with_label_weights_and_missing_labels_match_the_oracle():
    rng = np.random.default_rng(4)
    class_ids = np.array([0, 1, -1, 0, 1, 2])
    features = rng.normal(size=(6, 2, 4)).astype(np.float32)
    weights = np.array([0.5, 2.0, 1.5], np.float32)
    one_hot = np.zeros((6, 3), np.float32)
    one_hot[class_ids >= 0, class_ids[class_ids >= 0]] = 1
    for positives in losses.POSITIVES:
        want = oracle(features, one_hot, positives=positives, label_weights=weights)[0]
        got = losses.multilabel_supcon_loss(
            features, class_ids, positives=positives, label_weights=weights
        )
        np.testing.assert_allclose(got, want, rtol=2e-5, err_msg=positives)


def test_padding_changes_nothing():
    features, labels, _, _ = random_case(6, num_samples=6, masked=False)
    garbage = np.random.default_rng(0).normal(size=(3, 2, 5)).astype(np.float32) * 100
    padded_features = np.concatenate([features, garbage])
    padded_labels = np.concatenate([labels, np.ones((3, labels.shape[1]), np.float32)])
    mask = np.array([True] * 6 + [False] * 3)
    for positives in losses.POSITIVES:
        plain, plain_grad = jax.value_and_grad(
            lambda f, p=positives: losses.multilabel_supcon_loss(f, labels, positives=p)
        )(features)
        padded, padded_grad = jax.value_and_grad(
            lambda f, p=positives: losses.multilabel_supcon_loss(
                f, padded_labels, positives=p, sample_mask=mask
            )
        )(padded_features)
        np.testing.assert_allclose(padded, plain, rtol=1e-6)
        np.testing.assert_allclose(padded_grad[:6], plain_grad, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(padded_grad[6:], 0)


def test_jit_vmap_and_grad_compose():
    batches = [random_case(seed, masked=False)[:2] for seed in range(3)]
    features = np.stack([f for f, _ in batches])
    labels = np.stack([y for _, y in batches])
    loss_fn = lambda f, y: losses.similarity_dissimilarity_loss(f, y, temperature=0.2)
    vmapped = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))(features, labels)
    for i, (f, y) in enumerate(batches):
        value, grad = jax.value_and_grad(loss_fn)(f, y)
        np.testing.assert_allclose(vmapped[0][i], value, rtol=1e-6)
        np.testing.assert_allclose(vmapped[1][i], grad, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(value, oracle(f, y, temperature=0.2)[0], rtol=2e-5)


def test_no_positives_gives_zero_loss_and_zero_gradient():
    features = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    disjoint = np.eye(4, dtype=np.float32)
    for positives in losses.POSITIVES:
        value, grad = jax.value_and_grad(
            lambda f, p=positives: losses.multilabel_supcon_loss(f, disjoint, positives=p)
        )(features)
        assert float(value) == 0.0
        np.testing.assert_array_equal(grad, 0)
    everything_padded = np.zeros(4, bool)
    value, grad = jax.value_and_grad(
        lambda f: losses.similarity_dissimilarity_loss(f, disjoint, sample_mask=everything_padded)
    )(features)
    assert float(value) == 0.0 and np.all(grad == 0)


@pytest.mark.parametrize(
    ("scale", "temperature", "dtype"),
    [(1.0, 0.01, jnp.float32), (1e4, 0.07, jnp.float32), (0.0, 0.07, jnp.float32)],
)
def test_finite_at_extremes(scale, temperature, dtype):
    features, labels, mask, _ = random_case(8, masked=True)
    features = jnp.asarray(features * scale, dtype)
    for positives in losses.POSITIVES:
        value, grad = jax.value_and_grad(
            lambda f, p=positives: losses.multilabel_supcon_loss(
                f, labels, positives=p, temperature=temperature, sample_mask=mask
            )
        )(features)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), positives
    if scale == 1e4:  # scale-invariant: equal to the unscaled loss
        np.testing.assert_allclose(
            losses.similarity_dissimilarity_loss(features, labels),
            losses.similarity_dissimilarity_loss(features / 1e4, labels),
            rtol=1e-5,
        )


def test_temperature_001_matches_the_oracle_where_exp_would_underflow():
    features, labels, _, _ = random_case(9, masked=False)
    want = oracle(features, labels, temperature=0.01)[0]
    got = losses.similarity_dissimilarity_loss(features, labels, temperature=0.01)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_bfloat16_inputs_follow_float32():
    features, labels, _, _ = random_case(10, masked=False)
    value32 = losses.similarity_dissimilarity_loss(features, labels)
    value16, grad16 = jax.value_and_grad(lambda f: losses.similarity_dissimilarity_loss(f, labels))(
        jnp.asarray(features, jnp.bfloat16)
    )
    assert value16.dtype == jnp.float32 and grad16.dtype == jnp.bfloat16
    np.testing.assert_allclose(value16, value32, rtol=0.05)
    assert np.all(np.isfinite(np.asarray(grad16, np.float32)))


BAD_INPUTS = [
    # Shapes and values are ValueErrors; dtypes are TypeErrors, as in optax.
    (dict(features=np.zeros((4,))), ValueError, "`features`: got shape (4,)"),
    (dict(features=np.zeros((4, 2, 3, 1))), ValueError, "`features`: got shape (4, 2, 3, 1)"),
    (dict(features=np.zeros((4, 3), np.int32)), TypeError, "`features`: got dtype int32"),
    (dict(features=np.zeros((4, 3), np.complex64)), TypeError, "`features`: got dtype complex64"),
    (dict(labels=np.zeros((5, 3))), ValueError, "`labels`: got shape (5, 3)"),
    (dict(labels=np.zeros((4, 3, 1))), ValueError, "`labels`: got shape (4, 3, 1)"),
    (
        dict(labels=np.zeros((4,), np.float32)),
        TypeError,
        "`labels`: got 1-D labels of dtype float32",
    ),
    (dict(temperature=0.0), ValueError, "`temperature`: got 0.0"),
    (dict(temperature=-1), ValueError, "`temperature`: got -1"),
    (dict(temperature=jnp.ones(2)), TypeError, "`temperature`: got an array of shape (2,)"),
    (dict(positives="supcon"), ValueError, "`positives`: got 'supcon'"),
    (dict(exchange="gather"), ValueError, "`exchange`: got 'gather'"),
    (dict(jaccard_threshold=0.0), ValueError, "`jaccard_threshold`: got 0.0"),
    (dict(jaccard_threshold=1.5), ValueError, "`jaccard_threshold`: got 1.5"),
    (dict(label_weights=np.ones(4, np.float32)), ValueError, "`label_weights`: got shape (4,)"),
    (dict(label_weights=np.ones(3, np.int32)), TypeError, "`label_weights`: got dtype int32"),
    (dict(sample_mask=np.ones(3, bool)), ValueError, "`sample_mask`: got shape (3,)"),
    (dict(block_size=0), ValueError, "`block_size`: got 0"),
    (dict(block_size=2.0), TypeError, "`block_size`: got float 2.0"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_INPUTS)
def test_bad_input_is_an_error_naming_the_argument(change, error, message):
    arguments = dict(features=np.ones((4, 3), np.float32), labels=np.eye(4, 3, dtype=np.float32))
    arguments.update(change)
    with pytest.raises(error, match=re_escape(message)):
        losses.multilabel_supcon_loss(**arguments)
    with pytest.raises(error, match=re_escape(message)):  # the same at trace time
        jax.jit(
            lambda f: losses.multilabel_supcon_loss(
                f, **{k: v for k, v in arguments.items() if k != "features"}
            )
        )(arguments["features"])


def re_escape(text):
    return re.escape(text)


def test_validate_inputs_checks_values():
    features, labels = np.ones((3, 2), np.float32), np.eye(3, dtype=np.float32)
    losses.validate_inputs(features, labels, label_weights=np.ones(3, np.float32))
    losses.validate_inputs(features, np.array([0, -1, 2]))
    bad_labels = labels.copy()
    bad_labels[1, 2] = 2
    with pytest.raises(ValueError, match=re_escape("`labels`: got 2.0 at index (1, 2)")):
        losses.validate_inputs(features, bad_labels)
    bad_features = features.copy()
    bad_features[2, 1] = np.nan
    with pytest.raises(ValueError, match=re_escape("`features`: got a non-finite value nan")):
        losses.validate_inputs(bad_features, labels)
    with pytest.raises(ValueError, match=re_escape("`label_weights`: got 0.0 at index 1")):
        losses.validate_inputs(features, labels, label_weights=np.array([1, 0, 1], np.float32))
    with pytest.raises(ValueError, match=re_escape("`labels`: got class id -2 at index 0")):
        losses.validate_inputs(features, np.array([-2, 0, 1]))


def test_labels_from_indices():
    indices = np.array([[0, 3, -1], [2, 2, -1], [-1, -1, -1], [1, 0, 4]])
    want = np.zeros((4, 5), np.float32)
    for row, index_list in enumerate(indices):
        for index in index_list:
            if index >= 0:
                want[row, index] = 1
    np.testing.assert_array_equal(losses.labels_from_indices(indices, 5), want)
    with pytest.raises(ValueError, match="`label_indices`: got shape"):
        losses.labels_from_indices(np.zeros(3, np.int32), 5)


def test_the_core_imports_only_jax_and_numpy():
    heavy = ["flax", "optax", "tensorflow", "tensorflow_datasets", "torch", "orbax", "clu"]
    code = f"import sys, sdjax.losses; print([m for m in {heavy!r} if m in sys.modules])"
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert output.stdout.strip() == "[]", output.stdout


def index_lists(labels, width, seed=0):
    """`labels` as shuffled, -1-padded index lists of `width` slots with a repeated id per row."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in np.asarray(labels):
        ids = list(np.flatnonzero(row))
        ids = ids + ids[:1]  # a repeated id counts once
        ids = ids + [-1] * (width - len(ids))
        rows.append(rng.permutation(ids))
    return losses.LabelIndices(np.array(rows, np.int32))


def assert_index_lists_match_the_oracle_and_multi_hot(
    features, indices, labels, block_size, kwargs
):
    """The loss of `indices` equals the oracle's and that of the multi-hot `labels`, in value
    and gradient, on a case where both are far from zero."""
    want = oracle(features, labels, **kwargs)[0]
    value, grad = jax.value_and_grad(
        lambda f: losses.multilabel_supcon_loss(f, indices, block_size=block_size, **kwargs)
    )(features)
    dense_value, dense_grad = jax.value_and_grad(
        lambda f: losses.multilabel_supcon_loss(f, labels, block_size=block_size, **kwargs)
    )(features)
    np.testing.assert_allclose(value, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(value, dense_value, rtol=1e-6)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)
    assert want > 0 and np.abs(dense_grad).max() > 1e-3


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_label_indices_match_the_oracle_and_multi_hot(positives):
    features, labels, mask, label_weights = random_case(12, num_samples=8, num_classes=6)
    kwargs = dict(
        positives=positives,
        temperature=0.3,
        sample_mask=mask,
        label_weights=label_weights,
        jaccard_threshold=0.3,
    )
    indices = index_lists(labels, width=8)
    assert_index_lists_match_the_oracle_and_multi_hot(features, indices, labels, 3, kwargs)
    np.testing.assert_allclose(
        losses.pair_weights(indices, positives=positives, num_views=2, label_weights=label_weights),
        losses.pair_weights(labels, positives=positives, num_views=2, label_weights=label_weights),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "positives, width, num_classes, id_dtype",
    [
        ("any", 40, 30, np.int32),
        ("sd", 40, 30, np.int32),
        ("all", 9, 6, np.int16),
        ("jaccard", 9, 6, np.int16),
    ],
)
def test_unweighted_index_lists_count_shared_labels_exactly(
    positives, width, num_classes, id_dtype
):
    # Without label weights the shared labels are counted as integer sums of id comparisons,
    # in passes over the anchor slots (40 slots: 7 passes, the last one padded; 9: one pass).
    features, labels, mask, _ = random_case(13, num_samples=9, num_classes=num_classes)
    labels[1] = labels[2]  # identical sets: "all" has a positive across samples
    kwargs = dict(positives=positives, temperature=0.2, sample_mask=mask, jaccard_threshold=0.2)
    indices = index_lists(labels, width=width, seed=1)
    indices = losses.LabelIndices(indices.indices.astype(id_dtype))
    assert_index_lists_match_the_oracle_and_multi_hot(features, indices, labels, 4, kwargs)
    np.testing.assert_array_equal(losses.label_relations(indices), losses.label_relations(labels))


def test_label_indices_from_multi_hot_and_relations():
    labels = multi_hot({1, 2}, {1, 2}, {1}, {1, 2, 3}, {2, 4}, {5}, set())
    indices = losses.LabelIndices.from_multi_hot(labels)
    assert indices.indices.shape == (7, 3) and indices.indices[6].tolist() == [-1, -1, -1]
    np.testing.assert_array_equal(losses.labels_from_indices(indices.indices, 5), labels)
    np.testing.assert_array_equal(losses.label_relations(indices), losses.label_relations(labels))


def test_bad_label_indices_are_errors_naming_the_argument():
    features = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=re_escape("`labels`: got LabelIndices of shape (3, 2)")):
        losses.multilabel_supcon_loss(features, losses.LabelIndices(np.zeros((3, 2), np.int32)))
    with pytest.raises(TypeError, match=re_escape("`labels`: got LabelIndices of dtype float32")):
        losses.multilabel_supcon_loss(features, losses.LabelIndices(np.zeros((4, 2), np.float32)))
    with pytest.raises(ValueError, match=re_escape("`labels`: got class id -2 at index 1")):
        losses.validate_inputs(features, losses.LabelIndices(np.array([[0], [-2], [1], [2]])))
    with pytest.raises(ValueError, match=re_escape("`labels`: got class id 3, expected ids < 3")):
        losses.validate_inputs(
            features,
            losses.LabelIndices(np.array([[0], [3], [1], [2]])),
            label_weights=np.ones(3, np.float32),
        )
