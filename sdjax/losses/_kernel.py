"""The weighted-contrastive kernel: row terms of anchor blocks against the contrast set, the
block scan and the fused loss whose forward pass also yields its gradients (a custom_vjp)."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.losses._labels import (
    _Anchors,
    _block_weights,
    _candidate_counts,
    _ContrastSet,
    _with_label_scale,
)
from sdjax.losses._types import _Options


class _RowTerms(NamedTuple):
    """Per-anchor-view sums over (a part of) the contrast set, combinable across parts."""

    shift: jax.Array  # [B] max logit over the contrast set (-inf where it is empty)
    sum_exp: jax.Array  # [B] sum_c exp(s_ac - shift)
    total_weight: jax.Array  # [B] sum_b w_ab
    weighted_logits: jax.Array  # [B] sum_b w_ab s_ab
    num_positives: jax.Array  # [B] |P(a)| (not used by mulsupcon)


def _merge_terms(first: _RowTerms, second: _RowTerms) -> _RowTerms:
    """The terms of the union of two disjoint parts of the contrast set (online log-sum-exp)."""
    shift = jnp.maximum(first.shift, second.shift)
    safe = jnp.where(jnp.isfinite(shift), shift, 0.0)
    sum_exp = first.sum_exp * jnp.exp(first.shift - safe) + second.sum_exp * jnp.exp(
        second.shift - safe
    )
    return _RowTerms(
        shift,
        sum_exp,
        first.total_weight + second.total_weight,
        first.weighted_logits + second.weighted_logits,
        first.num_positives + second.num_positives,
    )


class _Scores(NamedTuple):
    """A block's logits and masks, kept for its gradient."""

    logits: jax.Array  # [B, M] s_ab, 0 outside the contrast set
    in_contrast: jax.Array  # [B, M] bool
    weights: jax.Array  # [B, M]
    exp_logits: jax.Array  # [B, M] exp(s_ab - shift), 0 outside the contrast set


def _row_terms(
    anchors: _Anchors, contrast: _ContrastSet, temperature: jax.Array, options: _Options
) -> tuple[_RowTerms, _Scores]:
    """The terms of a block of anchors against (a part of) the contrast set."""
    weights, in_contrast, num_positives = _block_weights(anchors, contrast, options)
    logits = jnp.dot(anchors.z, contrast.z.T) / temperature
    # The shift only keeps exp in range; it cancels in value and gradient.
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(in_contrast, logits, -jnp.inf), axis=1))
    safe_shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    # exp(-inf) = 0 outside the contrast set keeps the diagonal from overflowing (and NaN grads).
    exp_logits = jnp.exp(jnp.where(in_contrast, logits - safe_shift[:, None], -jnp.inf))
    # Written so that masked logits never meet a weight.
    in_contrast_logits = jnp.where(in_contrast, logits, 0.0)
    terms = _RowTerms(
        shift=shift,
        sum_exp=jnp.sum(exp_logits, axis=1),
        total_weight=jnp.sum(weights, axis=1),
        weighted_logits=jnp.sum(weights * in_contrast_logits, axis=1),
        num_positives=num_positives,
    )
    return terms, _Scores(in_contrast_logits, in_contrast, weights, exp_logits)


class _Finished(NamedTuple):
    """Per-anchor-view results once the whole contrast set has been seen."""

    losses: jax.Array  # [B] l_a
    anchor_weights: jax.Array  # [B]
    norm: jax.Array  # [B] |P(a)| (mulsupcon: label rows), at least 1
    log_normaliser: jax.Array  # [B] log sum_c exp s_ac


def _finish(terms: _RowTerms, anchors: _Anchors, options: _Options) -> _Finished:
    """l_a = -sum_b w_ab (s_ab - log sum_c exp s_ac) / |P(a)|, from the terms."""
    if options.positives == "mulsupcon":
        assert anchors.rows is not None
        norm = jnp.repeat(anchors.rows, options.num_views)  # the label rows with a positive
        anchor_weights = norm
    else:
        norm = terms.num_positives
        anchor_weights = (norm > 0).astype(norm.dtype)
    norm = jnp.maximum(norm, 1.0)
    safe_shift = jnp.where(jnp.isfinite(terms.shift), terms.shift, 0.0)
    log_normaliser = safe_shift + jnp.log(jnp.maximum(terms.sum_exp, 1e-30))
    losses = (terms.total_weight * log_normaliser - terms.weighted_logits) / norm
    return _Finished(losses, anchor_weights, norm, log_normaliser)


class _BlockGradients(NamedTuple):
    """What the backward pass needs from one block (all of sum_a anchor_weights_a * l_a)."""

    dlogits: jax.Array  # [B, M] gradient w.r.t. the logits s_ab
    logit_moment: jax.Array  # scalar sum_ab dlogits_ab * s_ab, for the temperature gradient


def _block_gradients(
    scores: _Scores, softmax: jax.Array, total_weight: jax.Array, scale: jax.Array
) -> _BlockGradients:
    """d(sum_a scale_a * norm_a * l_a)/ds for the softmax over the contrast set."""
    dlogits = scale[:, None] * (total_weight[:, None] * softmax - scores.weights)
    return _BlockGradients(dlogits, jnp.sum(dlogits * scores.logits))


def _gather_contrast(local: _ContrastSet, options: _Options) -> _ContrastSet:
    """The global contrast set: every device's candidates, in device order."""
    if options.axis_name is None:
        return local
    gathered: _ContrastSet = jax.tree.map(
        lambda x: jax.lax.all_gather(x, options.axis_name, tiled=True), local
    )
    return gathered


def _local_contrast(
    anchors: _Anchors, keys: _ContrastSet | None, options: _Options
) -> _ContrastSet:
    """This device's part of the contrast set: its keys, or else its anchor views."""
    if keys is not None:
        return keys
    return _ContrastSet(
        z=anchors.z,
        valid=anchors.valid,
        sample_ids=anchors.view_ids // options.num_views,
        view_ids=anchors.view_ids,
        labels=anchors.labels,
    )


def _pad_rows(x: jax.Array, pad: int, value: Any = 0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


class _Blocks(NamedTuple):
    """The local anchors padded to whole row blocks of `samples` samples."""

    padded: _Anchors
    num_blocks: int
    samples: int
    num_views: int

    def take(self, index: jax.Array | int) -> _Anchors:
        def view(x: jax.Array) -> jax.Array:
            size = self.samples * self.num_views
            return jax.lax.dynamic_slice_in_dim(x, index * size, size)

        def sample(x: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice_in_dim(x, index * self.samples, self.samples)

        anchors = self.padded
        return _Anchors(
            z=view(anchors.z),
            valid=view(anchors.valid),
            view_ids=view(anchors.view_ids),
            labels=jax.tree.map(sample, anchors.labels),
            label_scale=None if anchors.label_scale is None else sample(anchors.label_scale),
            rows=None if anchors.rows is None else sample(anchors.rows),
        )


def _blocks(anchors: _Anchors, options: _Options) -> _Blocks:
    """Row blocks of whole samples: about `block_size` views each."""
    num_views = options.num_views
    num_samples = anchors.z.shape[0] // num_views
    samples = max(1, min(-(-options.block_size // num_views), num_samples))
    num_blocks = -(-num_samples // samples)
    pad = num_blocks * samples - num_samples
    labels = anchors.labels
    padded = _Anchors(
        z=_pad_rows(anchors.z, pad * num_views),
        valid=_pad_rows(anchors.valid, pad * num_views, False),
        view_ids=_pad_rows(anchors.view_ids, pad * num_views, -1),
        labels=labels._replace(
            values=_pad_rows(labels.values, pad, -1 if labels.are_indices else 0),
            sizes=_pad_rows(labels.sizes, pad),
            weighted_sizes=_pad_rows(labels.weighted_sizes, pad),
        ),
        label_scale=None if anchors.label_scale is None else _pad_rows(anchors.label_scale, pad),
        rows=None if anchors.rows is None else _pad_rows(anchors.rows, pad),
    )
    return _Blocks(padded, num_blocks, samples, num_views)


def _map_blocks(
    blocks: _Blocks,
    block_fn: Callable[..., tuple[Any, Any]],
    init: Any,
    num_rows: int,
    per_view: Any = None,
) -> tuple[Any, Any]:
    """Scans `block_fn(carry, block anchors[, block rows of per_view]) -> (carry, per-view
    outputs)` over the blocks.

    Returns the final carry and the outputs stacked over the first `num_rows` anchor views.
    """
    views = blocks.samples * blocks.num_views
    padded = jax.tree.map(lambda x: _pad_rows(x, blocks.num_blocks * views - num_rows), per_view)

    def run(carry: Any, index: jax.Array | int) -> tuple[Any, Any]:
        if per_view is None:
            return block_fn(carry, blocks.take(index))
        rows = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, index * views, views), padded)
        return block_fn(carry, blocks.take(index), rows)

    if blocks.num_blocks == 1:
        carry, stacked = run(init, 0)
        stacked = jax.tree.map(lambda x: x[None], stacked)
    else:
        carry, stacked = jax.lax.scan(run, init, jnp.arange(blocks.num_blocks))
    stacked = jax.tree.map(lambda x: x.reshape((-1, *x.shape[2:]))[:num_rows], stacked)
    return carry, stacked


class _KernelGradients(NamedTuple):
    """Gradients of sum_a anchor_weights_a * l_a (over this device's anchors)."""

    anchor_z: jax.Array  # [M_local, D]: as anchors, plus as candidates without keys
    key_z: jax.Array | None  # [M_keys_local, D] with keys
    temperature: jax.Array  # scalar: this device's anchors' share


def _kernel_gradients(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    anchor_grad: jax.Array,
    contrast_grad: jax.Array,
    logit_moment: jax.Array,
    temperature: jax.Array,
) -> _KernelGradients:
    # L depends on tau only through s = z.z'/tau, so dL/dtau = -(1/tau) sum_ab dL/ds_ab s_ab.
    temperature_grad = -logit_moment / temperature
    if keys is None:
        return _KernelGradients(anchor_grad + contrast_grad, None, temperature_grad)
    return _KernelGradients(anchor_grad, contrast_grad, temperature_grad)


def _scan_blocks(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    temperature: jax.Array,
    options: _Options,
    with_gradient: bool,
) -> Any:
    """Runs the kernel over row blocks of the local anchors against the gathered contrast set.

    Returns (losses [M_local], anchor_weights [M_local]) and, with `with_gradient`, the
    `_KernelGradients`.
    """
    num_local = anchors.z.shape[0]
    contrast = _gather_contrast(_local_contrast(anchors, keys, options), options)
    counts = None
    if options.positives == "mulsupcon":
        counts = _candidate_counts(anchors, contrast, options)
    anchors = _with_label_scale(anchors, counts, label_weights, options)
    inv_temperature = 1.0 / temperature

    def block(carry: Any, block_anchors: _Anchors) -> tuple[Any, Any]:
        terms, scores = _row_terms(block_anchors, contrast, temperature, options)
        finished = _finish(terms, block_anchors, options)
        if not with_gradient:
            return carry, (finished.losses, finished.anchor_weights)
        softmax = scores.exp_logits / jnp.maximum(terms.sum_exp, 1e-30)[:, None]
        scale = finished.anchor_weights / finished.norm
        gradients = _block_gradients(scores, softmax, terms.total_weight, scale)
        anchor_grad = jnp.dot(gradients.dlogits, contrast.z) * inv_temperature
        contrast_grad, logit_moment = carry
        carry = (
            contrast_grad + jnp.dot(gradients.dlogits.T, block_anchors.z) * inv_temperature,
            logit_moment + gradients.logit_moment,
        )
        return carry, (finished.losses, finished.anchor_weights, anchor_grad)

    init = None
    if with_gradient:
        # Zeros shaped like what they accumulate, so that they vary over `axis_name` as it does.
        init = (jnp.zeros_like(contrast.z), jnp.zeros_like(anchors.z[0, 0]))
    carry, stacked = _map_blocks(_blocks(anchors, options), block, init, num_local)
    if not with_gradient:
        return stacked
    losses, anchor_weights, anchor_grad = stacked
    contrast_grad, logit_moment = carry
    if options.axis_name is not None:
        # Every device scored its own anchors against everyone's candidates: send each
        # candidate's share of the gradient back to the device that owns it.
        contrast_grad = jax.lax.psum_scatter(  # type: ignore[no-untyped-call]
            contrast_grad, options.axis_name, tiled=True
        )
    gradients = _kernel_gradients(
        anchors, keys, anchor_grad, contrast_grad, logit_moment, temperature
    )
    return losses, anchor_weights, gradients


def _psum(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    if axis_name is None:
        return x
    summed: jax.Array = jax.lax.psum(x, axis_name)  # type: ignore[no-untyped-call]
    return summed


def _mean_over_anchors(
    losses: jax.Array, anchor_weights: jax.Array, axis_name: Hashable | None
) -> tuple[jax.Array, jax.Array]:
    total = _psum(jnp.sum(anchor_weights * losses), axis_name)
    count = _psum(jnp.sum(anchor_weights), axis_name)
    return total / jnp.maximum(count, 1.0), count


def _fused_loss_primal(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    temperature: jax.Array,
    options: _Options,
) -> jax.Array:
    losses, anchor_weights = _scan_blocks(anchors, keys, label_weights, temperature, options, False)
    return _mean_over_anchors(losses, anchor_weights, options.axis_name)[0]


def _fused_loss_fwd(
    anchors: _Anchors,
    keys: _ContrastSet | None,
    label_weights: jax.Array | None,
    temperature: jax.Array,
    options: _Options,
) -> tuple[jax.Array, Any]:
    # One pass yields the loss and its gradients, so the backward pass recomputes nothing.
    losses, anchor_weights, gradients = _scan_blocks(
        anchors, keys, label_weights, temperature, options, True
    )
    loss, count = _mean_over_anchors(losses, anchor_weights, options.axis_name)
    gradients = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), gradients)
    return loss, (gradients, _zero_cotangents((anchors, keys, label_weights)))


def _fused_loss_bwd(options: _Options, residuals: Any, cotangent: jax.Array) -> Any:
    gradients, (anchors, keys, label_weights) = residuals
    scaled = jax.tree.map(lambda g: cotangent * g, gradients)
    anchors = anchors._replace(z=scaled.anchor_z)
    if keys is not None:
        keys = keys._replace(z=scaled.key_z)
    return anchors, keys, label_weights, scaled.temperature


def _zero_cotangents(tree: Any) -> Any:
    def zero(x: jax.Array) -> Any:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


_fused_loss = jax.custom_vjp(_fused_loss_primal, nondiff_argnums=(4,))
_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def _varying(x: jax.Array, axis_name: Hashable) -> jax.Array:
    try:
        varying: jax.Array = jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # already varying
        return x
    return varying
