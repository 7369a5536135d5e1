"""The ring exchange: key shards travel around the devices, nobody holds the whole contrast set."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sdjax.losses._kernel import (
    _block_gradients,
    _Blocks,
    _blocks,
    _finish,
    _kernel_gradients,
    _local_contrast,
    _map_blocks,
    _mean_over_anchors,
    _merge_terms,
    _psum,
    _row_terms,
    _RowTerms,
    _varying,
    _zero_cotangents,
)
from sdjax.losses._labels import _Anchors, _candidate_counts, _ContrastSet, _with_label_scale
from sdjax.losses._types import _Options


def _ring_permute(tree: Any, options: _Options) -> Any:
    """Every device's `tree` moves on to the next device of the ring."""
    size = jax.lax.axis_size(options.axis_name)
    ring = [(device, (device + 1) % size) for device in range(size)]
    return jax.tree.map(
        lambda x: jax.lax.ppermute(x, options.axis_name, ring),  # type: ignore[no-untyped-call]
        tree,
    )


def _ring(local: Any, fold: Any, init: Any, travelling: Any, options: _Options) -> Any:
    """Folds `fold(carry, shard, travelling) -> (carry, travelling)` over every device's shard.

    The shards go around the ring, one `ppermute` per step, the next one in flight while this
    one is scored. `travelling` (e.g. a shard's gradient) moves with its shard and is back on
    the shard's own device at the end. Returns (carry, travelling).
    """

    def step(state: Any, _: Any) -> tuple[Any, None]:
        carry, shard, travel = state
        incoming = _ring_permute(shard, options)
        carry, travel = fold(carry, shard, travel)
        return (carry, incoming, _ring_permute(travel, options)), None

    # Every device's values differ (e.g. keys' constant ids would not): types match the carry.
    state = jax.tree.map(lambda x: _varying(x, options.axis_name), (init, local, travelling))
    num_steps = jax.lax.axis_size(options.axis_name) - 1
    (carry, last, travel), _ = jax.lax.scan(step, state, None, num_steps)
    carry, travel = fold(carry, last, travel)
    return carry, _ring_permute(travel, options)


def _ring_counts(anchors: _Anchors, local: _ContrastSet, options: _Options) -> jax.Array | None:
    """mulsupcon's candidate counts (see `_with_label_scale`) over the global contrast set."""
    if options.positives != "mulsupcon":
        return None
    if not anchors.labels.are_indices:
        return _psum(_candidate_counts(anchors, local, options), options.axis_name)

    def fold(counts: jax.Array, shard: _ContrastSet, _: None) -> tuple[jax.Array, None]:
        return counts + _candidate_counts(anchors, shard, options), None

    labels_only = local._replace(z=local.z[:, :0])  # the features need not travel
    init = jnp.zeros_like(anchors.labels.values, anchors.z.dtype)
    counts: jax.Array = _ring(labels_only, fold, init, None, options)[0]
    return counts


def _ring_setup(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    options: _Options,
) -> tuple[_Anchors, _ContrastSet, _Blocks]:
    local = _local_contrast(anchors, keys, options)
    anchors = _with_label_scale(
        anchors, _ring_counts(anchors, local, options), label_weights, options
    )
    return anchors, local, _blocks(anchors, options)


def _ring_loss_fwd(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    temperature: jax.Array,
    options: _Options,
) -> tuple[jax.Array, Any]:
    """Forward: each shard adds its log-sum-exp and positive terms to the local anchors'."""
    zeros = _zero_cotangents((anchors, keys, label_weights))
    prepared, local, blocks = _ring_setup(anchors, keys, label_weights, options)
    num_local = anchors.z.shape[0]

    def fold(terms: _RowTerms, shard: _ContrastSet, _: None) -> tuple[_RowTerms, None]:
        def block(carry: None, block_anchors: _Anchors) -> tuple[None, _RowTerms]:
            return carry, _row_terms(block_anchors, shard, temperature, options)[0]

        return _merge_terms(terms, _map_blocks(blocks, block, None, num_local)[1]), None

    zero = jnp.zeros((num_local,), anchors.z.dtype) * anchors.valid  # varies like the anchors
    init = _RowTerms(zero - jnp.inf, zero, zero, zero, zero)
    terms = _ring(local, fold, init, None, options)[0]
    finished = _finish(terms, prepared, options)
    loss, count = _mean_over_anchors(finished.losses, finished.anchor_weights, options.axis_name)
    scale = finished.anchor_weights / finished.norm / jnp.maximum(count, 1.0)
    residuals = (prepared, keys, temperature, finished.log_normaliser, terms.total_weight, scale)
    return loss, (residuals, zeros)


def _ring_loss_bwd(options: _Options, residuals: Any, cotangent: jax.Array) -> Any:
    """Backward: a second trip round the ring; each shard's gradient travels home with it."""
    (anchors, keys, temperature, log_normaliser, total_weight, scale), zeros = residuals
    local = _local_contrast(anchors, keys, options)
    blocks = _blocks(anchors, options)
    num_local = anchors.z.shape[0]
    inv_temperature = 1.0 / temperature
    per_view = (log_normaliser, total_weight, cotangent * scale)

    def fold(carry: Any, shard: _ContrastSet, shard_grad: jax.Array) -> Any:
        def block(inner: Any, block_anchors: _Anchors, rows: Any) -> Any:
            block_log_normaliser, block_total_weight, block_scale = rows
            _, scores = _row_terms(block_anchors, shard, temperature, options)
            softmax = jnp.exp(
                jnp.where(
                    scores.in_contrast, scores.logits - block_log_normaliser[:, None], -jnp.inf
                )
            )
            gradients = _block_gradients(scores, softmax, block_total_weight, block_scale)
            shard_grad, moment = inner
            inner = (
                shard_grad + jnp.dot(gradients.dlogits.T, block_anchors.z) * inv_temperature,
                moment + gradients.logit_moment,
            )
            return inner, jnp.dot(gradients.dlogits, shard.z) * inv_temperature

        anchor_grad, moment = carry
        (shard_grad, moment), block_grads = _map_blocks(
            blocks, block, (shard_grad, moment), num_local, per_view
        )
        return (anchor_grad + block_grads, moment), shard_grad

    init = (jnp.zeros_like(anchors.z), jnp.zeros_like(anchors.z[0, 0]))
    (anchor_grad, moment), contrast_grad = _ring(
        local, fold, init, jnp.zeros_like(local.z), options
    )
    gradients = _kernel_gradients(anchors, keys, anchor_grad, contrast_grad, moment, temperature)
    anchor_zeros, key_zeros, label_weight_zeros = zeros
    anchor_zeros = anchor_zeros._replace(z=gradients.anchor_z)
    if keys is not None:
        key_zeros = key_zeros._replace(z=gradients.key_z)
    return anchor_zeros, key_zeros, label_weight_zeros, gradients.temperature


def _ring_loss_primal(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    temperature: jax.Array,
    options: _Options,
) -> jax.Array:
    return _ring_loss_fwd(anchors, keys, label_weights, temperature, options)[0]


_ring_loss = jax.custom_vjp(_ring_loss_primal, nondiff_argnums=(4,))
_ring_loss.defvjp(_ring_loss_fwd, _ring_loss_bwd)
