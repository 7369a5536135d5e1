"""The query/key form (`keys=Keys(...)`), the traced temperature and `"sd_swapped"`, against
the float64 loop oracle and the official SupCon/MulSupCon estimators, on one and 8 devices."""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from oracle import mulsupcon_official, oracle, query_key_oracle, supcon_official

from sdjax import losses

NUM_DEVICES = 8
MESH = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))


def query_key_case(seed, num_samples=5, num_views=2, num_keys=9, dim=4, num_classes=4):
    """Anchors [N, V, D] and keys [M, D]: key m < N is a view of sample m (the momentum
    encoder's), the rest are queue entries (-1); some keys and one sample are padding."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, num_views, dim)).astype(np.float32)
    keys = rng.normal(size=(num_keys, dim)).astype(np.float32)
    labels = (rng.random((num_samples, num_classes)) < 0.4).astype(np.float32)
    labels[0] = 0.0  # an anchor without labels: its own key is its only positive
    key_labels = (rng.random((num_keys, num_classes)) < 0.4).astype(np.float32)
    key_labels[: num_samples - 1] = labels[: num_samples - 1]  # a sample's key shares its labels
    sample_ids = np.where(np.arange(num_keys) < num_samples - 1, np.arange(num_keys), -1)
    key_mask = rng.random(num_keys) < 0.8
    key_mask[:2] = True
    sample_mask = np.ones(num_samples, bool)
    sample_mask[-1] = False
    label_weights = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    return dict(
        features=features,
        labels=labels,
        keys=losses.Keys(keys, key_labels, mask=key_mask, sample_ids=sample_ids.astype(np.int32)),
        sample_mask=sample_mask,
        label_weights=label_weights,
    )


def with_key_features(keys, features):
    return dataclasses.replace(keys, features=features)


def oracle_of(case, **kwargs):
    keys = case["keys"]
    return query_key_oracle(
        case["features"],
        case["labels"],
        keys.features,
        keys.labels,
        key_sample_ids=keys.sample_ids,
        key_mask=keys.mask,
        sample_mask=case["sample_mask"],
        label_weights=case["label_weights"],
        **kwargs,
    )


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_query_key_matches_the_oracle(positives):
    case = query_key_case(0)
    kwargs = dict(positives=positives, temperature=0.2, jaccard_threshold=0.3)
    want, want_per_anchor, want_anchor_weights = oracle_of(case, **kwargs)
    for block_size in (None, 3):  # 3 does not divide the 10 anchor views
        got = losses.multilabel_supcon_loss(**case, block_size=block_size, **kwargs)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    per_anchor = losses.per_anchor_losses(**case, **kwargs)
    np.testing.assert_allclose(per_anchor.losses, want_per_anchor, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(per_anchor.anchor_weights, want_anchor_weights)
    assert want > 0 and want_anchor_weights.sum() > 1  # the comparison means something


def finite_differences(function, x, eps=1e-4):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for index in itertools.product(*map(range, x.shape)):
        plus, minus = x.copy(), x.copy()
        plus[index] += eps
        minus[index] -= eps
        grad[index] = (function(plus) - function(minus)) / (2 * eps)
    return grad


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_gradients_wrt_features_keys_and_temperature_match_the_oracle(positives):
    case = query_key_case(1, num_samples=4, num_keys=7, dim=3)
    kwargs = dict(positives=positives, jaccard_threshold=0.3)
    temperature = 0.5
    loss_of = lambda **change: oracle_of({**case, **change}, temperature=temperature, **kwargs)[0]
    want_features = finite_differences(lambda f: loss_of(features=f), case["features"])
    keys = case["keys"]
    want_keys = finite_differences(
        lambda k: loss_of(keys=with_key_features(keys, k)), keys.features
    )
    want_temperature = finite_differences(
        lambda t: oracle_of(case, temperature=float(t[0]), **kwargs)[0], [temperature]
    )[0]

    arrays = {k: v for k, v in case.items() if k not in ("features", "keys")}
    for block_size in (None, 3):
        grads = jax.jit(
            jax.grad(
                lambda f, k, t, b=block_size: losses.multilabel_supcon_loss(
                    f,
                    keys=with_key_features(keys, k),
                    temperature=t,
                    block_size=b,
                    **arrays,
                    **kwargs,
                ),
                argnums=(0, 1, 2),
            )
        )(case["features"], keys.features, jnp.float32(temperature))
        # Central differences of a float64 loss at eps = 1e-4 are good to ~1e-8; the float32
        # kernel's gradient is good to ~1e-6 relative, so 2e-3 / 2e-5 leave a wide margin.
        np.testing.assert_allclose(grads[0], want_features, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(grads[1], want_keys, rtol=2e-3, atol=2e-5)
        np.testing.assert_allclose(grads[2], want_temperature, rtol=2e-3, atol=2e-5)
    dense = jax.grad(
        lambda f, k: losses.reduce_per_anchor(
            losses.per_anchor_losses(
                f, keys=with_key_features(keys, k), temperature=temperature, **arrays, **kwargs
            )
        ),
        argnums=(0, 1),
    )(case["features"], keys.features)
    np.testing.assert_allclose(dense[0], want_features, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(dense[1], want_keys, rtol=2e-3, atol=2e-5)
    assert np.abs(want_keys).max() > 1e-2 and abs(want_temperature) > 1e-2


def official_case(seed, num_samples=6, queue=10, dim=5, num_classes=4):
    """Queries and their keys (one per sample) plus a queue; every sample has a label."""
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_samples, dim)).astype(np.float32)
    batch_keys = queries + 0.3 * rng.normal(size=queries.shape).astype(np.float32)
    queue_keys = rng.normal(size=(queue, dim)).astype(np.float32)
    labels = (rng.random((num_samples + queue, num_classes)) < 0.4).astype(np.float32)
    labels[np.arange(num_samples + queue), rng.integers(0, num_classes, num_samples + queue)] = 1
    keys = np.concatenate([batch_keys, queue_keys])
    sample_ids = np.concatenate([np.arange(num_samples), np.full(queue, -1)]).astype(np.int32)
    return queries, labels[:num_samples], keys, labels, sample_ids


MASK_RULES = {
    "all": lambda a, b: bool(np.array_equal(a, b)),
    "any": lambda a, b: bool(np.any((a > 0) & (b > 0))),
}


@pytest.mark.parametrize("positives", ["mulsupcon", "all", "any"])
def test_query_key_equals_the_official_estimators(positives):
    queries, labels, keys, key_labels, sample_ids = official_case(2)
    temperature = 0.1
    if positives == "mulsupcon":
        want = mulsupcon_official(queries, labels, keys, key_labels, temperature)
    else:
        rule = MASK_RULES[positives]
        want = supcon_official(queries, labels, keys, key_labels, temperature, rule)
    got = losses.multilabel_supcon_loss(
        queries,
        labels,
        positives=positives,
        temperature=temperature,
        keys=losses.Keys(keys, key_labels, sample_ids=sample_ids),
    )
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_traced_temperature_equals_the_static_one_and_learns():
    case = query_key_case(3)
    static = losses.multilabel_supcon_loss(**case, temperature=0.15)
    traced = jax.jit(lambda t: losses.multilabel_supcon_loss(**case, temperature=t))(
        jnp.float32(0.15)
    )
    np.testing.assert_allclose(traced, static, rtol=1e-6)
    # A learnable log-temperature: dL/dlog(tau) = tau * dL/dtau, here in the in-batch form.
    features, labels = case["features"], case["labels"]
    log_tau_grad = jax.jit(
        jax.grad(lambda u: losses.multilabel_supcon_loss(features, labels, temperature=jnp.exp(u)))
    )(jnp.log(jnp.float32(0.15)))
    want = finite_differences(
        lambda u: oracle(features, labels, temperature=float(np.exp(u[0])))[0], [np.log(0.15)]
    )[0]
    np.testing.assert_allclose(log_tau_grad, want, rtol=2e-3)
    assert abs(want) > 1e-2


def test_sd_swapped_is_sd_with_the_roles_of_anchor_and_candidate_swapped():
    labels = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    swapped = losses.pair_weights(labels, positives="sd_swapped")
    np.testing.assert_allclose(swapped, losses.pair_weights(labels, positives="sd").T, rtol=1e-6)
    # {1,2,3} vs {2,3,4,5}: K_s = 2/4 (candidate's share), K_d = 1/(1 + |{1}|) = 1/2.
    np.testing.assert_allclose(swapped[0, 2], 1 / 4, rtol=1e-6)


def test_pair_weights_with_keys():
    labels = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    key_labels = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 0]], np.float32)
    weights = np.asarray(
        losses.pair_weights(
            labels,
            num_views=2,
            keys=losses.Keys(
                None,
                key_labels,
                mask=np.array([True, True, True, False]),
                sample_ids=np.array([1, -1, -1, 0]),
            ),
        )
    )
    assert weights.shape == (4, 4)
    # Sample 0's views: key 0 identical (1), key 1 subset (1/2), key 2 overlap (1/2 * 1/2); key 3
    # would be its own view but is padding. Sample 1 has no labels: key 0 is its own view.
    np.testing.assert_allclose(weights[:2], [[1, 1 / 2, 1 / 4, 0]] * 2)
    np.testing.assert_allclose(weights[2:], [[1, 0, 0, 0]] * 2)


def shard_case(seed, num_samples=16, num_keys=24):
    case = query_key_case(seed, num_samples=num_samples, num_keys=num_keys, num_classes=5)
    case["sample_mask"][5:8] = False  # device 3 holds padding only, device 2 some
    return jax.tree.map(jnp.asarray, case)


@pytest.mark.slow
@pytest.mark.parametrize("exchange", losses.EXCHANGES)
@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_sharded_query_key_matches_single_device(positives, exchange):
    """The ring runs on index lists, all_gather on multi-hot labels."""
    case = shard_case(4)
    kwargs = dict(positives=positives, label_weights=case.pop("label_weights"), block_size=3)
    keys = case["keys"]
    sharded_labels, sharded_keys = case["labels"], keys
    if exchange == "ring":
        sharded_labels = losses.LabelIndices.from_multi_hot(np.asarray(case["labels"]))
        key_indices = losses.LabelIndices.from_multi_hot(np.asarray(keys.labels))
        sharded_keys = dataclasses.replace(keys, labels=key_indices)
    mask = case.pop("sample_mask")
    want, want_grads = jax.value_and_grad(
        lambda f, k, t: losses.multilabel_supcon_loss(
            f,
            case["labels"],
            sample_mask=mask,
            keys=with_key_features(keys, k),
            temperature=t,
            **kwargs,
        ),
        argnums=(0, 1, 2),
    )(case["features"], keys.features, jnp.float32(0.2))

    sharded = losses.make_sharded_loss(MESH, "data", exchange=exchange, **kwargs)
    got, got_grads = jax.jit(
        jax.value_and_grad(
            lambda f, k, t: sharded(
                f, sharded_labels, mask, keys=with_key_features(sharded_keys, k), temperature=t
            ),
            argnums=(0, 1, 2),
        )
    )(case["features"], keys.features, jnp.float32(0.2))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    want_oracle = query_key_oracle(
        case["features"],
        case["labels"],
        keys.features,
        keys.labels,
        key_sample_ids=keys.sample_ids,
        key_mask=keys.mask,
        sample_mask=mask,
        label_weights=kwargs["label_weights"],
        positives=positives,
        temperature=0.2,
    )[0]
    np.testing.assert_allclose(got, want_oracle, rtol=2e-5)
    assert np.abs(want_grads[1]).max() > 1e-3 and abs(float(want_grads[2])) > 1e-3


@pytest.mark.slow
def test_sharded_in_batch_loss_learns_its_temperature():
    case = shard_case(5)
    features, labels, mask = case["features"], case["labels"], case["sample_mask"]
    want = jax.grad(
        lambda t: losses.multilabel_supcon_loss(features, labels, sample_mask=mask, temperature=t)
    )(jnp.float32(0.2))
    sharded = losses.make_sharded_loss(MESH, "data")
    got = jax.jit(jax.grad(lambda t: sharded(features, labels, mask, temperature=t)))(
        jnp.float32(0.2)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert abs(float(want)) > 1e-3


def three_keys(**change):
    """Keys for 4 anchors of D = 3 with 3 classes, with some fields changed."""
    fields = dict(features=np.ones((3, 3), np.float32), labels=np.zeros((3, 3), np.float32))
    return losses.Keys(**{**fields, **change})


KEY_ERRORS = [
    (three_keys(features=None), ValueError, "`keys.features`: got None, expected [M, D]"),
    (three_keys(labels=None), ValueError, "`keys.labels`: got None"),
    (
        three_keys(features=np.ones((3, 2), np.float32)),
        ValueError,
        "`keys.features`: got shape (3, 2), expected [M, D] with D = 3",
    ),
    (
        three_keys(labels=np.zeros((3, 4))),
        ValueError,
        "`keys.labels`: got shape (3, 4), expected [M, 3]",
    ),
    (
        three_keys(sample_ids=np.zeros(3, np.float32)),
        TypeError,
        "`keys.sample_ids`: got dtype float32",
    ),
    (three_keys(mask=np.ones(3, np.int32)), TypeError, "`keys.mask`: got dtype int32"),
    (three_keys(mask=np.ones(2, bool)), ValueError, "`keys.mask`: got shape (2,), expected [3]"),
    ({"features": np.ones((3, 3))}, TypeError, "`keys`: got dict, expected Keys(features"),
]


@pytest.mark.parametrize(("keys", "error", "message"), KEY_ERRORS)
def test_bad_keys_are_errors_naming_the_argument(keys, error, message):
    arguments = dict(features=np.ones((4, 3), np.float32), labels=np.eye(4, 3, dtype=np.float32))
    with pytest.raises(error, match=re_escape(message)):
        losses.multilabel_supcon_loss(**arguments, keys=keys)


@pytest.mark.parametrize(
    "removed", ["contrast_features", "contrast_labels", "contrast_mask", "contrast_sample_ids"]
)
def test_the_removed_key_arguments_say_what_replaced_them(removed):
    features, labels = np.ones((4, 3), np.float32), np.eye(4, 3, dtype=np.float32)
    message = re_escape(f"`{removed}`: removed, the keys are one argument: keys=Keys(")
    calls = [
        lambda **kw: losses.multilabel_supcon_loss(features, labels, **kw),
        lambda **kw: losses.similarity_dissimilarity_loss(features, labels, **kw),
        lambda **kw: losses.per_anchor_losses(features, labels, **kw),
        lambda **kw: losses.pair_weights(labels, **kw),
        lambda **kw: losses.validate_inputs(features, labels, **kw),
        lambda **kw: losses.make_sharded_loss(MESH, "data", **kw),
        lambda **kw: losses.make_sharded_loss(MESH, "data")(features[:0], labels[:0], **kw),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=message):
            call(**{removed: np.ones(3)})


def re_escape(text):
    return re.escape(text)


def test_validate_inputs_checks_the_keys_values():
    features, labels = np.ones((3, 2), np.float32), np.eye(3, dtype=np.float32)
    keys = losses.Keys(np.ones((2, 2), np.float32), labels[:2], sample_ids=np.array([2, -1]))
    losses.validate_inputs(features, labels, keys=keys)
    with pytest.raises(ValueError, match=re_escape("`keys.sample_ids`: got 3 at index 0")):
        losses.validate_inputs(
            features, labels, keys=dataclasses.replace(keys, sample_ids=np.array([3, -1]))
        )
    bad = with_key_features(keys, np.array([[1, np.inf]], np.float32).repeat(2, 0))
    with pytest.raises(ValueError, match=re_escape("`keys.features`: got a non-finite")):
        losses.validate_inputs(features, labels, keys=bad)


def test_keys_pass_through_jit_as_a_pytree():
    case = query_key_case(6)
    want = losses.multilabel_supcon_loss(**case)
    got = jax.jit(lambda c: losses.multilabel_supcon_loss(**c))(case)
    assert float(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)  # jit may fuse differently: a few ulps
