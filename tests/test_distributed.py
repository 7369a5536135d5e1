"""The cross-device loss equals the single-device loss on the concatenated batch, in value and
gradient: under shard_map and pmap on 8 fake CPU devices, and across 2 processes on loopback."""

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import multiprocess_worker  # the loopback workers' batch, shared with the reference
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from loopback import run_two_processes

from sdjax import losses

NUM_DEVICES = 8
MESH = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))


def make_batch(seed, num_samples=24, num_views=2, dim=6, num_classes=5, uneven=True):
    """Random batch whose padding leaves each device a different number of real samples."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, num_views, dim)).astype(np.float32)
    labels = (rng.random((num_samples, num_classes)) < 0.35).astype(np.float32)
    mask = np.ones(num_samples, bool)
    if uneven:
        per_device = num_samples // NUM_DEVICES
        for device in range(NUM_DEVICES):
            # Device d keeps d % per_device + 1 real samples: counts differ across devices.
            mask[device * per_device + device % per_device + 1 : (device + 1) * per_device] = False
    label_weights = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    return jnp.asarray(features), jnp.asarray(labels), jnp.asarray(mask), jnp.asarray(label_weights)


def reference(features, labels, mask, **kwargs):
    return jax.value_and_grad(
        lambda f: losses.multilabel_supcon_loss(f, labels, sample_mask=mask, **kwargs)
    )(features)


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_shard_map_matches_single_device(positives):
    features, labels, mask, label_weights = make_batch(1)
    kwargs = dict(positives=positives, label_weights=label_weights, temperature=0.2)
    want, want_grad = reference(features, labels, mask, **kwargs)

    sharded = losses.make_sharded_loss(MESH, "data", **kwargs)
    got, got_grad = jax.jit(jax.value_and_grad(sharded))(features, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert float(want) > 0 and np.abs(want_grad).max() > 1e-3  # the check is not vacuous


@pytest.mark.slow
@pytest.mark.parametrize("positives", ["sd", "mulsupcon", "all"])
def test_pmap_matches_single_device(positives):
    features, labels, mask, _ = make_batch(2, num_views=3)
    want, want_grad = reference(features, labels, mask, positives=positives)

    def per_device(f, y, m):
        return jax.value_and_grad(
            lambda f: losses.multilabel_supcon_loss(
                f, y, positives=positives, sample_mask=m, axis_name="data"
            )
        )(f)

    split = lambda x: x.reshape(NUM_DEVICES, -1, *x.shape[1:])
    got, got_grad = jax.pmap(per_device, axis_name="data")(
        split(features), split(labels), split(mask)
    )
    np.testing.assert_allclose(got, np.full(NUM_DEVICES, want), rtol=1e-5)
    np.testing.assert_allclose(got_grad.reshape(features.shape), want_grad, rtol=1e-4, atol=1e-6)


def projected_batch():
    features, labels, mask, _ = make_batch(3)
    projection = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    want = jax.grad(
        lambda w: losses.similarity_dissimilarity_loss(features @ w, labels, sample_mask=mask)
    )(projection)
    return features, labels, mask, projection, want


def local_param_grad(w, f, y, m):
    return jax.grad(
        lambda w: losses.similarity_dissimilarity_loss(f @ w, y, sample_mask=m, axis_name="data")
    )(w)


def test_param_grads_inside_shard_map_are_already_summed():
    """shard_map types w as device-invariant, so its gradient arrives summed over devices:
    a further psum would count it 8 times."""
    features, labels, mask, projection, want = projected_batch()
    got = jax.jit(
        jax.shard_map(
            local_param_grad,
            mesh=MESH,
            in_specs=(P(), P("data"), P("data"), P("data")),
            out_specs=P(),
        )
    )(projection, features, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_param_grads_inside_pmap_need_a_psum():
    """pmap has no invariance types: each device's gradient is its own samples' share."""
    features, labels, mask, projection, want = projected_batch()
    split = lambda x: x.reshape(NUM_DEVICES, -1, *x.shape[1:])
    shares = jax.pmap(local_param_grad, axis_name="data", in_axes=(None, 0, 0, 0))(
        projection, split(features), split(labels), split(mask)
    )
    np.testing.assert_allclose(shares.sum(axis=0), want, rtol=1e-4, atol=1e-6)
    summed = jax.pmap(
        lambda *a: jax.lax.psum(local_param_grad(*a), "data"),
        axis_name="data",
        in_axes=(None, 0, 0, 0),
    )(projection, split(features), split(labels), split(mask))
    np.testing.assert_allclose(summed[3], want, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [1, 5, 7])
def test_blockwise_under_shard_map_matches_dense(block_size):
    features, labels, mask, _ = make_batch(4, num_samples=32)
    want, want_grad = jax.value_and_grad(
        lambda f: losses.reduce_per_anchor(losses.per_anchor_losses(f, labels, sample_mask=mask))
    )(features)
    sharded = losses.make_sharded_loss(MESH, block_size=block_size)
    got, got_grad = jax.jit(jax.value_and_grad(sharded))(features, labels, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_sharded_loss_rejects_a_batch_that_does_not_split():
    features, labels, mask, _ = make_batch(5, num_samples=24)
    with pytest.raises(ValueError, match="`features`: got 20 samples, expected a multiple of"):
        losses.make_sharded_loss(MESH)(features[:20], labels[:20], mask[:20])
    with pytest.raises(ValueError, match="`axis_name`"):
        losses.make_sharded_loss(MESH, "batch")


def test_forgetting_axis_name_inside_shard_map_is_an_error():
    """A local-only loss is device-varying, so shard_map refuses a replicated output."""
    features, labels, _, _ = make_batch(6, uneven=False)
    local_only = jax.shard_map(
        lambda f, y: losses.similarity_dissimilarity_loss(f, y),
        mesh=MESH,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match="out_specs"):
        jax.jit(local_only)(features, labels)


WORKER = Path(__file__).with_name("multiprocess_worker.py")


@pytest.mark.slow
def test_two_processes_over_loopback_match_single_process(tmp_path):
    run_two_processes(WORKER, tmp_path, timeout=120)

    features, labels, mask = multiprocess_worker.global_batch()
    for positives in multiprocess_worker.POSITIVES_CHECKED:
        want, want_grad = reference(features, labels, mask, positives=positives)
        for process_id, exchange in itertools.product(range(2), losses.EXCHANGES):
            name = f"{positives}_{exchange}_{process_id}.json"
            result = json.loads((tmp_path / name).read_text())
            rows = np.asarray(result["rows"])
            np.testing.assert_allclose(result["loss"], want, rtol=1e-5)
            np.testing.assert_allclose(result["grad"], want_grad[rows], rtol=1e-4, atol=1e-6)
            assert result["num_global_devices"] == 4 and result["num_local_devices"] == 2


def sharded_value_and_grads(features, labels, mask, exchange, **kwargs):
    """Loss and its gradients w.r.t. the features and a traced temperature, over MESH."""
    sharded = losses.make_sharded_loss(MESH, "data", exchange=exchange, **kwargs)
    return jax.jit(
        jax.value_and_grad(lambda f, t: sharded(f, labels, mask, temperature=t), argnums=(0, 1))
    )(features, jnp.asarray(0.2, features.dtype))


@pytest.mark.slow
@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_ring_equals_all_gather(positives):
    """In float64 (the float32 ring is checked by the query/key and loopback tests): the ring on
    index lists against all_gather on multi-hot labels, with padding, label weights and a traced
    temperature, to float64 rounding."""
    features, labels, mask, label_weights = make_batch(8)
    with jax.enable_x64(True):
        features = jnp.asarray(features, jnp.float64)
        kwargs = dict(
            positives=positives,
            label_weights=jnp.asarray(label_weights, jnp.float64),
            block_size=3,
        )
        indices = losses.LabelIndices.from_multi_hot(np.asarray(labels))
        want = sharded_value_and_grads(features, labels, mask, "all_gather", **kwargs)
        got = sharded_value_and_grads(features, indices, mask, "ring", **kwargs)
    for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert got_part.dtype == np.float64
        np.testing.assert_allclose(got_part, want_part, rtol=1e-12, atol=1e-14)
    value, (grad, tau_grad) = want
    assert float(value) > 0 and np.abs(grad).max() > 1e-3 and abs(float(tau_grad)) > 1e-3
