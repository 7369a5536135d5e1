"""One test per fault of issue 13: each asserts the outcome a user gets, not the absence of a crash."""

# --------------------------------------------------------------------------------------------
# Trainer: workdir, checkpoints, config errors, multi-host
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Data sources and the experiment runner
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Loss edge inputs
# --------------------------------------------------------------------------------------------

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracle import oracle

from sdjax import losses


def loss_case(seed=0, num_samples=6, num_views=2, dim=4, num_classes=4):
    """A batch in which every sample has a label, so every anchor has a positive."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, num_views, dim)).astype(np.float32)
    labels = (rng.random((num_samples, num_classes)) < 0.5).astype(np.float32)
    labels[np.arange(num_samples), rng.integers(0, num_classes, num_samples)] = 1.0
    return features, labels


def test_zero_samples_is_a_value_error_naming_features():
    with pytest.raises(ValueError, match=r"`features`: got shape \(0, 3\)"):
        losses.multilabel_supcon_loss(np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32))


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_huge_feature_norms_are_normalised_like_unit_ones(positives):
    features, labels = loss_case(1)
    features = np.clip(features, -3, 3)  # so that 1e38 * x stays below float32's 3.4e38
    scales = np.logspace(20, 38, num=features.shape[0] * 2).reshape((*features.shape[:2], 1))
    huge = (features * scales).astype(np.float32)
    assert np.all(np.isfinite(huge)) and np.all(np.abs(huge).max(axis=-1) >= 1e20)
    want = losses.multilabel_supcon_loss(features, labels, positives=positives)
    got = losses.multilabel_supcon_loss(huge, labels, positives=positives)
    # The unit directions agree to float32 rounding (~1e-7); logits / 0.07 amplify that ~15x.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(want) > 0


def test_a_float_sample_mask_is_a_type_error_naming_sample_mask():
    features, labels = loss_case(2)
    with pytest.raises(TypeError, match=r"`sample_mask`: got dtype float32, expected bool"):
        losses.multilabel_supcon_loss(features, labels, sample_mask=np.full(6, 0.5, np.float32))


@pytest.mark.parametrize("temperature", [True, "0.1"])
def test_a_bool_or_string_temperature_is_a_type_error_naming_temperature(temperature):
    features, labels = loss_case(3)
    with pytest.raises(TypeError, match=r"`temperature`: got (bool True|str '0.1')"):
        losses.multilabel_supcon_loss(features, labels, temperature=temperature)


def test_block_size_accepts_numpy_integers():
    features, labels = loss_case(4, num_samples=12)
    got = losses.multilabel_supcon_loss(features, labels, block_size=np.int64(5))
    np.testing.assert_allclose(got, oracle(features, labels)[0], rtol=2e-5)


def test_python_lists_are_accepted_as_arrays():
    features, labels = loss_case(5, num_views=1)
    got = losses.multilabel_supcon_loss(features[:, 0].tolist(), labels.astype(int).tolist())
    np.testing.assert_allclose(got, oracle(features, labels)[0], rtol=2e-5)


@pytest.mark.parametrize("block_size", [None, 4])
def test_axis_name_outside_a_mapped_context_is_an_error_naming_axis_name(block_size):
    features, labels = loss_case(6)
    with pytest.raises(ValueError, match="`axis_name`: got 'data', which is not a mapped axis"):
        losses.multilabel_supcon_loss(features, labels, axis_name="data", block_size=block_size)


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_float64_inputs_compute_in_float64_under_x64(positives):
    features, labels = loss_case(7)
    rng = np.random.default_rng(7)
    # Weights that float32 cannot hold exactly: float32 label algebra would be off by ~1e-8.
    label_weights = rng.uniform(0.5, 2.0, labels.shape[1])
    kwargs = dict(positives=positives, temperature=0.3, jaccard_threshold=0.3)
    with jax.enable_x64(True):
        features64 = jnp.asarray(features, jnp.float64) + 1e-9  # off the float32 grid too
        value, grad = jax.value_and_grad(
            lambda f: losses.multilabel_supcon_loss(
                f, labels, label_weights=jnp.asarray(label_weights), **kwargs
            )
        )(features64)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        want = oracle(np.asarray(features64), labels, label_weights=label_weights, **kwargs)[0]
        # float64 rounding (1e-16) through O(100) terms and a log-sum-exp stays below 1e-12.
        np.testing.assert_allclose(float(value), want, rtol=1e-12)
        for low in (jnp.bfloat16, jnp.float16, jnp.float32):  # float32 stays the floor
            assert losses.multilabel_supcon_loss(features.astype(low), labels).dtype == jnp.float32
    assert float(want) > 0
