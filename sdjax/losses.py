"""The Similarity-Dissimilarity (S-D) loss family for multi-label supervised contrastive learning.

Pure, jittable functions of jax and numpy only. The math is `docs/SPEC.md`, which also lists the
points where it decides what the paper leaves open.

Every loss of the family is one weighted-contrastive kernel (`_anchor_block`): logits against the
contrast set, a log-softmax over it, and a weighted sum over positives. Only the pair weights change
with `positives`. The kernel runs over row blocks of anchors against the full contrast set, which is
the global batch when `axis_name` is given, so memory stays O(block * N + N * D).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "POSITIVES",
    "PerAnchorLosses",
    "Relation",
    "label_relations",
    "labels_from_indices",
    "make_sharded_loss",
    "multilabel_supcon_loss",
    "pair_weights",
    "per_anchor_losses",
    "reduce_per_anchor",
    "similarity_dissimilarity_loss",
    "validate_inputs",
]

POSITIVES = (
    "sd",
    "all",
    "any",
    "jaccard",
    "mulsupcon",
    "sd_similarity_only",
    "sd_dissimilarity_only",
)

# Feature norms are clamped below by this, as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Automatic row blocks hold this many logits: [block, N] float32 near 16 MiB on a CPU (cache
# sized), 256 MiB on a GPU/TPU, where small blocks leave the chip idle (measured on an H100:
# experiments/README.md). Working memory is a few such matrices, whatever N is.
_AUTO_BLOCK_ELEMENTS = {"cpu": 1 << 22, "accelerator": 1 << 26}
# Label intersections must be exact integers on every backend (TPUs default to bf16 passes).
_EXACT = jax.lax.Precision.HIGHEST


class Relation(enum.IntEnum):
    """How a candidate's label set T relates to an anchor's label set S (docs/SPEC.md)."""

    IDENTICAL = 0  # S = T, non-empty
    SUBSET = 1  # T strictly inside S
    SUPERSET = 2  # S strictly inside T
    OVERLAP = 3  # they share a label, neither contains the other
    DISJOINT = 4  # no shared label (an empty set is disjoint from everything)


class PerAnchorLosses(NamedTuple):
    """Per-anchor results, shaped like the views: [N, V] (or [N_local, V] with `axis_name`).

    The loss is `sum(anchor_weights * losses) / max(sum(anchor_weights), 1)`
    (see `reduce_per_anchor`). `anchor_weights` is `has_positive` as float, except for
    `positives="mulsupcon"`, where it counts the anchor's label rows (a, k) that have a positive
    and `losses` is the mean over those rows.
    """

    losses: jax.Array
    has_positive: jax.Array
    anchor_weights: jax.Array


class _Labels(NamedTuple):
    """Labels of a set of views: multi-hot [M, C] float32, or class ids [M] int32 (-1 = none)."""

    values: jax.Array
    class_weights: jax.Array | None  # [C] float32, or None for unit weights

    @property
    def are_ids(self) -> bool:
        return self.values.ndim == 1

    def take(self, start: jax.Array | int, size: int) -> _Labels:
        return self._replace(values=jax.lax.dynamic_slice_in_dim(self.values, start, size))

    def cardinality(self, weighted: bool) -> jax.Array:
        """|y| for every view: [M] float32."""
        if self.are_ids:
            present = self.values >= 0
            if weighted and self.class_weights is not None:
                safe_ids = jnp.where(present, self.values, 0)
                return jnp.where(present, self.class_weights[safe_ids], 0.0)
            return present.astype(jnp.float32)
        if weighted and self.class_weights is not None:
            return jnp.dot(self.values, self.class_weights, precision=_EXACT)
        return jnp.sum(self.values, axis=-1)

    def intersection(self, other: _Labels, weighted: bool) -> jax.Array:
        """|y_a ∩ y_b| for every anchor a in self and candidate b in other: [Ma, Mb] float32."""
        if self.are_ids:
            shared = (self.values[:, None] == other.values[None, :]) & (self.values[:, None] >= 0)
            return shared * self.cardinality(weighted)[:, None]
        rows = self.values
        if weighted and self.class_weights is not None:
            rows = rows * self.class_weights
        return jnp.dot(rows, other.values.T, precision=_EXACT)


class _Options(NamedTuple):
    """The static (hashable) settings of one loss call."""

    positives: str
    temperature: float
    jaccard_threshold: float
    num_views: int
    axis_name: Hashable | None
    block_size: int


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape_error(name: str, got: Any, expected: str) -> ValueError:
    return ValueError(f"`{name}`: got {got}, expected {expected}.")


def _check_options(positives: str, temperature: Any, jaccard_threshold: Any) -> None:
    if positives not in POSITIVES:
        raise ValueError(f"`positives`: got {positives!r}, expected one of {POSITIVES}.")
    if isinstance(temperature, jax.Array) or not np.isscalar(temperature):
        raise ValueError(
            f"`temperature`: got {type(temperature).__name__} {temperature!r}, expected a "
            "Python number > 0 (it is static: the loss is compiled per temperature)."
        )
    if not math.isfinite(float(temperature)) or float(temperature) <= 0:
        raise ValueError(f"`temperature`: got {temperature!r}, expected a finite number > 0.")
    if not np.isscalar(jaccard_threshold) or not 0 < float(jaccard_threshold) <= 1:
        raise ValueError(
            f"`jaccard_threshold`: got {jaccard_threshold!r}, expected a number in (0, 1]."
        )


def _check_arrays(
    features: Any, labels: Any, sample_mask: Any, label_weights: Any
) -> tuple[int, int, int]:
    """Checks ranks, shapes and dtype kinds at trace time; returns (N, V, D)."""
    features_shape = np.shape(features)
    if len(features_shape) not in (2, 3):
        raise _shape_error("features", f"shape {features_shape}", "[N, D] or [N, V, D]")
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise _shape_error("features", f"dtype {jnp.result_type(features)}", "a real float dtype")
    num_samples, feature_dim = features_shape[0], features_shape[-1]
    num_views = features_shape[1] if len(features_shape) == 3 else 1
    if num_views < 1 or feature_dim < 1:
        raise _shape_error("features", f"shape {features_shape}", "V >= 1 views and D >= 1")

    labels_shape, labels_dtype = np.shape(labels), jnp.result_type(labels)
    if len(labels_shape) not in (1, 2) or labels_shape[0] != num_samples:
        raise _shape_error(
            "labels",
            f"shape {labels_shape}",
            f"[N, C] multi-hot or [N] class ids with N = {num_samples} (from `features`)",
        )
    if len(labels_shape) == 1 and not jnp.issubdtype(labels_dtype, jnp.integer):
        raise _shape_error("labels", f"1-D labels of dtype {labels_dtype}", "integer class ids")
    if not (
        jnp.issubdtype(labels_dtype, jnp.integer)
        or jnp.issubdtype(labels_dtype, jnp.floating)
        or labels_dtype == jnp.bool_
    ):
        raise _shape_error("labels", f"dtype {labels_dtype}", "bool, integer or float 0/1 values")

    if sample_mask is not None and np.shape(sample_mask) != (num_samples,):
        raise _shape_error(
            "sample_mask", f"shape {np.shape(sample_mask)}", f"[N] = ({num_samples},)"
        )

    if label_weights is not None:
        weights_shape = np.shape(label_weights)
        if len(labels_shape) == 2 and weights_shape != (labels_shape[1],):
            raise _shape_error(
                "label_weights",
                f"shape {weights_shape}",
                f"[C] = ({labels_shape[1]},) from `labels`",
            )
        if len(weights_shape) != 1:
            raise _shape_error("label_weights", f"shape {weights_shape}", "[C]")
        if not jnp.issubdtype(jnp.result_type(label_weights), jnp.floating):
            raise _shape_error(
                "label_weights", f"dtype {jnp.result_type(label_weights)}", "positive floats"
            )
    return num_samples, num_views, feature_dim


def validate_inputs(features, labels, *, sample_mask=None, label_weights=None) -> None:
    """Checks the values that `jit` cannot check. Call it eagerly, outside `jit`.

    The losses check shapes and dtypes while tracing; this checks values: multi-hot labels in
    {0, 1}, class ids >= -1, finite features and label weights > 0.

    Args:
      features: [N, D] or [N, V, D] floats.
      labels: [N, C] multi-hot or [N] integer class ids (-1 = no label).
      sample_mask: optional [N] bool.
      label_weights: optional [C] positive floats.

    Raises:
      ValueError: naming the argument and the first offending entry.
    """
    _check_arrays(features, labels, sample_mask, label_weights)
    features = np.asarray(jnp.asarray(features, jnp.float32))
    bad = np.argwhere(~np.isfinite(features))
    if bad.size:
        raise ValueError(
            f"`features`: got a non-finite value {features[tuple(bad[0])].item()} at index "
            f"{tuple(bad[0].tolist())}, expected finite values."
        )
    labels = np.asarray(labels)
    if labels.ndim == 2:
        bad = np.argwhere((labels != 0) & (labels != 1))
        if bad.size:
            raise ValueError(
                f"`labels`: got {labels[tuple(bad[0])].item()!r} at index "
                f"{tuple(bad[0].tolist())}, "
                "expected multi-hot values in {0, 1}."
            )
    else:
        bad = np.argwhere(labels < -1)
        if bad.size:
            raise ValueError(
                f"`labels`: got class id {labels[tuple(bad[0])]} at index {bad[0][0]}, "
                "expected ids >= 0, or -1 for a sample without a label."
            )
    if label_weights is not None:
        weights = np.asarray(label_weights)
        bad = np.argwhere(~(np.isfinite(weights) & (weights > 0)))
        if bad.size:
            raise ValueError(
                f"`label_weights`: got {weights[bad[0][0]]} at index {bad[0][0]}, "
                "expected finite weights > 0."
            )
        if labels.ndim == 1 and labels.size and labels.max() >= weights.shape[0]:
            raise ValueError(
                f"`labels`: got class id {labels.max()}, expected ids < {weights.shape[0]} "
                "(the length of `label_weights`)."
            )


# --------------------------------------------------------------------------------------------
# Pair weights: the only thing that differs between the members of the family
# --------------------------------------------------------------------------------------------


def _label_weight_block(
    anchors: _Labels,
    candidates: _Labels,
    options: _Options,
    contrast: jax.Array,
    label_totals: jax.Array | None,
    anchor_valid: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pair weights from labels alone, for a block of anchors against all candidates.

    Args:
      anchors, candidates: labels of the block's anchor views and of all candidate views.
      options: the static settings.
      contrast: [B, M] bool, the contrast set A(a).
      label_totals: mulsupcon only: per-class counts of valid candidate views, [C] (multi-hot) or
        None (class ids, counted from `contrast`).
      anchor_valid: [B] bool.

    Returns:
      (weights [B, M], positive [B, M] bool, norm [B]). The anchor's loss is
      -sum_b weights * log_softmax / norm, where norm is |P(a)| or, for mulsupcon, the number of
      the anchor's label rows with a positive.
    """
    positives = options.positives
    if positives == "mulsupcon":
        if anchors.are_ids:
            same_class = anchors.intersection(candidates, weighted=False) * contrast
            per_class_positives = jnp.sum(same_class, axis=1)  # |P_k(a)| for k = y_a
            has_rows = per_class_positives > 0
            weights = same_class / jnp.where(has_rows, per_class_positives, 1.0)[:, None]
            return weights, weights > 0, has_rows.astype(jnp.float32)
        # |P_k(a)|: valid views with label k, minus the anchor itself.
        per_class_positives = label_totals[None, :] - anchors.values * anchor_valid[:, None]
        row_scale = jnp.where(
            per_class_positives > 0, anchors.values / jnp.maximum(per_class_positives, 1.0), 0.0
        )
        weights = jnp.dot(row_scale, candidates.values.T, precision=_EXACT) * contrast
        # Padding anchors have no rows: their weights are already masked by `contrast`.
        num_rows = jnp.sum(anchors.values * (per_class_positives > 0), axis=1) * anchor_valid
        return weights, weights > 0, num_rows

    shared = anchors.intersection(candidates, weighted=False)
    positive = shared > 0
    if positives == "any":
        weights = positive.astype(jnp.float32)
    elif positives == "all":
        positive = (
            positive
            & (shared == anchors.cardinality(False)[:, None])
            & (shared == candidates.cardinality(False)[None, :])
        )
        weights = positive.astype(jnp.float32)
    else:
        weighted = anchors.class_weights is not None
        shared_w = anchors.intersection(candidates, weighted=True) if weighted else shared
        anchor_size = anchors.cardinality(True)[:, None]
        candidate_size = candidates.cardinality(True)[None, :]
        similarity = shared_w / jnp.maximum(anchor_size, 1e-30)  # K_s
        dissimilarity = 1.0 / (1.0 + candidate_size - shared_w)  # K_d
        if positives == "sd":
            weights = similarity * dissimilarity
        elif positives == "sd_similarity_only":
            weights = similarity
        elif positives == "sd_dissimilarity_only":
            weights = dissimilarity
        else:  # jaccard
            union = anchor_size + candidate_size - shared_w
            jaccard = shared_w / jnp.maximum(union, 1e-30)
            positive = positive & (jaccard >= options.jaccard_threshold)
            weights = jaccard
        weights = jnp.where(positive, weights, 0.0)
    positive = positive & contrast
    weights = weights * contrast
    return weights, positive, positive.sum(axis=1).astype(jnp.float32)


def _block_weights(
    row_start: jax.Array,
    block_size: int,
    anchors: _Labels,
    anchor_valid: jax.Array,
    candidates: _Labels,
    candidate_valid: jax.Array,
    label_totals: jax.Array | None,
    options: _Options,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Weights, contrast mask, per-anchor normaliser and per-anchor reduction weight of a block.

    `row_start` is the block's first view in the global (gathered) view order, so that the
    anchor itself (b = a) and the anchor's other views (same(a, b)) can be recognised.
    """
    num_candidates = candidate_valid.shape[0]
    anchor_index = row_start + jnp.arange(block_size)
    candidate_index = jnp.arange(num_candidates)
    not_self = anchor_index[:, None] != candidate_index[None, :]
    contrast = not_self & candidate_valid[None, :] & anchor_valid[:, None]
    weights, positive, norm = _label_weight_block(
        anchors, candidates, options, contrast, label_totals, anchor_valid
    )
    if options.num_views > 1 and options.positives != "mulsupcon":
        same_sample = contrast & (
            anchor_index[:, None] // options.num_views
            == candidate_index[None, :] // options.num_views
        )
        norm = norm + jnp.sum(same_sample & ~positive, axis=1)
        weights = jnp.where(same_sample, 1.0, weights)
    has_positive = norm > 0
    if options.positives == "mulsupcon":
        reduction_weight = norm
    else:
        reduction_weight = has_positive.astype(jnp.float32)
    return weights, contrast, jnp.maximum(norm, 1.0), reduction_weight


# --------------------------------------------------------------------------------------------
# The weighted-contrastive kernel
# --------------------------------------------------------------------------------------------


def _anchor_block(
    row_start: jax.Array,
    anchor_z: jax.Array,
    anchors: _Labels,
    anchor_valid: jax.Array,
    candidate_z: jax.Array,
    candidates: _Labels,
    candidate_valid: jax.Array,
    label_totals: jax.Array | None,
    options: _Options,
    with_gradient: bool,
):
    """Loss terms of a block of anchors against every candidate.

    Returns per-anchor losses [B] and reduction weights [B]; with `with_gradient`, also
    dlogits [B, M], the gradient of sum_a reduction_weight_a * loss_a w.r.t. the logits.
    """
    block_size = anchor_z.shape[0]
    weights, contrast, norm, reduction_weight = _block_weights(
        row_start,
        block_size,
        anchors,
        anchor_valid,
        candidates,
        candidate_valid,
        label_totals,
        options,
    )
    logits = jnp.dot(anchor_z, candidate_z.T) / options.temperature
    masked = jnp.where(contrast, logits, -jnp.inf)
    # The shift only keeps exp in range; it cancels in value and gradient.
    shift = jax.lax.stop_gradient(jnp.max(masked, axis=1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    # exp(-inf) = 0 outside the contrast set keeps the diagonal from overflowing (and NaN grads).
    exp_logits = jnp.exp(jnp.where(contrast, logits - shift, -jnp.inf))
    sum_exp = jnp.maximum(jnp.sum(exp_logits, axis=1, keepdims=True), 1e-30)
    log_normaliser = shift + jnp.log(sum_exp)
    total_weight = jnp.sum(weights, axis=1, keepdims=True)
    # -sum_b w_ab (s_ab - log sum_c exp s_ac): written so that masked logits never meet a weight.
    weighted_logits = jnp.sum(weights * jnp.where(contrast, logits, 0.0), axis=1, keepdims=True)
    losses = ((total_weight * log_normaliser - weighted_logits) / norm[:, None])[:, 0]
    if not with_gradient:
        return losses, reduction_weight
    scale = (reduction_weight / norm)[:, None]
    dlogits = scale * (total_weight * exp_logits / sum_exp - weights)
    return losses, reduction_weight, dlogits


def _normalize(features: jax.Array) -> jax.Array:
    features = features.astype(jnp.float32)
    squared_norm = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS**2))


def _gather(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def _global_offset(num_local: int, axis_name: Hashable | None) -> jax.Array | int:
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * num_local


def _prepare(anchor_labels: _Labels, anchor_valid: jax.Array, options: _Options):
    """Gathers the contrast set's labels and validity, and mulsupcon's per-class counts."""
    candidates = anchor_labels._replace(values=_gather(anchor_labels.values, options.axis_name))
    candidate_valid = _gather(anchor_valid, options.axis_name)
    label_totals = None
    if options.positives == "mulsupcon" and not candidates.are_ids:
        label_totals = jnp.sum(candidates.values * candidate_valid[:, None], axis=0)
    return candidates, candidate_valid, label_totals


def _padded_blocks(num_rows: int, block_size: int) -> tuple[int, int]:
    num_blocks = -(-num_rows // block_size)
    return num_blocks, num_blocks * block_size - num_rows


def _pad_rows(x: jax.Array, pad: int, value=0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def _scan_blocks(z, labels, valid, options, with_gradient):
    """Runs the kernel over row blocks of the local anchors against the gathered contrast set.

    Returns (losses [M_local], reduction weights [M_local]) and, with `with_gradient`, the
    gradient of sum_a reduction_weight_a * loss_a w.r.t. the local z: [M_local, D].
    """
    num_local = z.shape[0]
    block_size = options.block_size
    num_blocks, pad = _padded_blocks(num_local, block_size)
    candidate_z = _gather(z, options.axis_name)
    candidates, candidate_valid, label_totals = _prepare(labels, valid, options)
    offset = _global_offset(num_local, options.axis_name)

    padded_z = _pad_rows(z, pad)
    padded_labels = labels._replace(
        values=_pad_rows(labels.values, pad, -1 if labels.are_ids else 0)
    )
    padded_valid = _pad_rows(valid, pad, False)

    def block(carry, block_index):
        start = block_index * block_size
        anchor_z = jax.lax.dynamic_slice_in_dim(padded_z, start, block_size)
        outputs = _anchor_block(
            offset + start,
            anchor_z,
            padded_labels.take(start, block_size),
            jax.lax.dynamic_slice_in_dim(padded_valid, start, block_size),
            candidate_z,
            candidates,
            candidate_valid,
            label_totals,
            options,
            with_gradient,
        )
        if not with_gradient:
            return carry, outputs
        losses, reduction_weight, dlogits = outputs
        inv_temperature = 1.0 / options.temperature
        anchor_grad = jnp.dot(dlogits, candidate_z) * inv_temperature
        carry = carry + jnp.dot(dlogits.T, anchor_z) * inv_temperature
        return carry, (losses, reduction_weight, anchor_grad)

    init = jnp.zeros_like(candidate_z) if with_gradient else None
    if num_blocks == 1:
        carry, stacked = block(init, 0)
        stacked = jax.tree.map(lambda x: x[None], stacked)
    else:
        carry, stacked = jax.lax.scan(block, init, jnp.arange(num_blocks))
    stacked = jax.tree.map(lambda x: x.reshape((num_blocks * block_size, *x.shape[2:])), stacked)
    stacked = jax.tree.map(lambda x: x[:num_local], stacked)
    if not with_gradient:
        return stacked
    losses, reduction_weight, anchor_grad = stacked
    candidate_grad = carry
    if options.axis_name is not None:
        # Every device scored its own anchors against everyone's candidates: send each
        # candidate's share of the gradient back to the device that owns it.
        candidate_grad = jax.lax.psum_scatter(candidate_grad, options.axis_name, tiled=True)
    return losses, reduction_weight, anchor_grad + candidate_grad


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _mean_over_anchors(losses, reduction_weight, axis_name):
    total = _psum(jnp.sum(reduction_weight * losses), axis_name)
    count = _psum(jnp.sum(reduction_weight), axis_name)
    return total / jnp.maximum(count, 1.0), count


def _fused_loss_primal(z, label_values, valid, class_weights, options):
    labels = _Labels(label_values, class_weights)
    losses, reduction_weight = _scan_blocks(z, labels, valid, options, with_gradient=False)
    return _mean_over_anchors(losses, reduction_weight, options.axis_name)[0]


def _fused_loss_fwd(z, label_values, valid, class_weights, options):
    # One pass yields the loss and dloss/dz, so the backward pass recomputes nothing.
    labels = _Labels(label_values, class_weights)
    losses, reduction_weight, grad = _scan_blocks(z, labels, valid, options, with_gradient=True)
    loss, count = _mean_over_anchors(losses, reduction_weight, options.axis_name)
    grad = grad / jnp.maximum(count, 1.0)
    zeros = jax.tree.map(_zero_cotangent, (label_values, valid, class_weights))
    return loss, (grad, zeros)


def _fused_loss_bwd(options, residuals, cotangent):
    grad, zeros = residuals
    return (cotangent * grad, *zeros)


def _zero_cotangent(x):
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


_fused_loss = jax.custom_vjp(_fused_loss_primal, nondiff_argnums=(4,))
_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _as_views(
    features,
    labels,
    sample_mask,
    label_weights,
    *,
    positives,
    temperature,
    jaccard_threshold,
    axis_name,
    block_size,
):
    """Checks the inputs and flattens samples to sample-major views: view m = n * V + v."""
    _check_options(positives, temperature, jaccard_threshold)
    num_samples, num_views, feature_dim = _check_arrays(
        features, labels, sample_mask, label_weights
    )
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"`block_size`: got {block_size!r}, expected None or an int >= 1.")
    num_local_views = num_samples * num_views
    z = _normalize(jnp.reshape(features, (num_local_views, feature_dim)))
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        values = jnp.repeat(labels.astype(jnp.int32), num_views)
    else:
        values = jnp.repeat(labels.astype(jnp.float32), num_views, axis=0)
    if label_weights is not None:
        label_weights = jnp.asarray(label_weights, jnp.float32)
    if sample_mask is None:
        valid = jnp.ones((num_local_views,), bool)
    else:
        valid = jnp.repeat(jnp.asarray(sample_mask).astype(bool), num_views)
    if block_size is None:
        num_global_views = num_local_views * _axis_size(axis_name)
        budget = _AUTO_BLOCK_ELEMENTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
        block_size = max(8, budget // max(num_global_views, 1))
    options = _Options(
        positives=positives,
        temperature=float(temperature),
        jaccard_threshold=float(jaccard_threshold),
        num_views=num_views,
        axis_name=axis_name,
        block_size=min(block_size, num_local_views),
    )
    return z, _Labels(values, label_weights), valid, options, (num_samples, num_views)


def _axis_size(axis_name: Hashable | None) -> int:
    if axis_name is None:
        return 1
    return jax.lax.axis_size(axis_name)


def multilabel_supcon_loss(
    features: jax.Array,
    labels: jax.Array,
    *,
    positives: str = "sd",
    temperature: float = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Multi-label supervised contrastive loss with a choice of positives and pair weights.

    Every view is an anchor; its contrast set is every other valid view in the (global) batch.
    The loss is the mean over anchors that have a positive of
    `-(1/|P(a)|) sum_{b in P(a)} w_ab log softmax_{c in A(a)}(s_ac)[b]`, with `s = z_a . z_b / tau`
    on L2-normalised features. `positives` chooses P(a) and w (docs/SPEC.md):

    * `"sd"`: shared label; w = K_s * K_d (the Similarity-Dissimilarity loss).
    * `"all"`: identical non-empty label sets; w = 1.
    * `"any"`: shared label; w = 1.
    * `"jaccard"`: Jaccard index >= `jaccard_threshold`; w = Jaccard index.
    * `"mulsupcon"`: one row per (anchor, anchor label k); positives carry k; mean over rows.
    * `"sd_similarity_only"` / `"sd_dissimilarity_only"`: ablations, w = K_s / w = K_d.

    Two views of one sample are always positives of weight 1 (mulsupcon: through their labels).

    Args:
      features: [N, D] or [N, V, D] embeddings (any float dtype). Normalised here.
      labels: [N, C] multi-hot (bool, int or float 0/1) or [N] integer class ids, where -1 means
        no label. Class ids are single-label, and "sd", "all" and "any" then equal SupCon.
      positives: one of `POSITIVES`.
      temperature: a Python number > 0.
      sample_mask: [N] bool; False marks padding, which is neither anchor nor candidate.
      label_weights: [C] positive floats: |S| = sum of the weights of S's labels. Used by "sd",
        its ablations and "jaccard"; the other choices do not use cardinalities.
      jaccard_threshold: in (0, 1]; used by "jaccard".
      axis_name: inside `jax.shard_map` or `jax.pmap`, the axis over which the batch is split.
        The local samples are the anchors, the contrast set is the global batch, and the result
        is the global loss on every device. Its gradient w.r.t. the local features is the
        matching slice of the single-device gradient. Easiest: `make_sharded_loss`, with
        `jax.grad` taken outside. Inside `shard_map`, the gradient of a replicated (P())
        parameter already arrives summed over devices: do not psum it again. Inside `pmap`,
        each device gets its samples' share: `jax.lax.psum` it (pmean would be 1/N too small).
      block_size: anchor views per row block. None (default) picks blocks of about 4M logits
        on a CPU and 64M on a GPU or TPU, so memory is O(block * N + N * D) at any batch size.
        Any value gives the same result.

    Returns:
      A float32 scalar. 0 (with zero gradient) when no anchor has a positive.

    Raises:
      ValueError: at trace time, for a wrong shape, rank or dtype kind, `temperature <= 0`, an
        unknown `positives`, `jaccard_threshold` outside (0, 1], or `label_weights` of the wrong
        length. Value checks that `jit` cannot do are in `validate_inputs`.

    References:
      Huang, Long, Luo, "Similarity-Dissimilarity Loss for Multi-label Supervised Contrastive
      Learning", arXiv:2410.13439. Khosla et al., "Supervised Contrastive Learning", 2020.
      Zhang and Wu, "Multi-Label Supervised Contrastive Learning", AAAI 2024.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sdjax.losses import multilabel_supcon_loss
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(multilabel_supcon_loss(features, labels, positives="any")), 4)
      0.0279
    """
    z, labels, valid, options, _ = _as_views(
        features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=block_size,
    )
    return _fused_loss(z, labels.values, valid, labels.class_weights, options)


def similarity_dissimilarity_loss(
    features: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """The Similarity-Dissimilarity (S-D) loss: `multilabel_supcon_loss(positives="sd")`.

    A candidate b sharing a label with anchor a is a positive of weight
    `w_ab = K_s * K_d = (|y_a ∩ y_b| / |y_a|) * 1 / (1 + |y_b \\ y_a|)`.

    Args:
      features: [N, D] or [N, V, D] embeddings (normalised here).
      labels: [N, C] multi-hot or [N] integer class ids (-1 = no label).
      temperature: a Python number > 0.
      sample_mask: [N] bool; False marks padding.
      label_weights: [C] positive floats for weighted cardinalities.
      axis_name: the mapped axis to gather the contrast set over (see `multilabel_supcon_loss`).
      block_size: anchor views per row block; None picks one.

    Returns:
      A float32 scalar.

    References:
      Huang, Long, Luo, arXiv:2410.13439.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import similarity_dissimilarity_loss
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(similarity_dissimilarity_loss(features, labels)), 4)
      0.014
    """
    return multilabel_supcon_loss(
        features,
        labels,
        positives="sd",
        temperature=temperature,
        sample_mask=sample_mask,
        label_weights=label_weights,
        axis_name=axis_name,
        block_size=block_size,
    )


def per_anchor_losses(
    features: jax.Array,
    labels: jax.Array,
    *,
    positives: str = "sd",
    temperature: float = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
) -> PerAnchorLosses:
    """Per-anchor losses and has-positive masks, for users who reduce the loss themselves.

    Arguments are those of `multilabel_supcon_loss`. This path is differentiated by plain
    autodiff through one dense [M_local, M] block. With `axis_name`, the results are the local
    anchors' (reduce them with `jax.lax.psum`).

    Returns:
      `PerAnchorLosses`, each field shaped [N, V]. `reduce_per_anchor` gives the loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import per_anchor_losses, reduce_per_anchor
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> result = per_anchor_losses(features, labels)
      >>> result.has_positive[:, 0].tolist()
      [True, True, False]
      >>> round(float(reduce_per_anchor(result)), 4)
      0.014
    """
    z, labels, valid, options, (num_samples, num_views) = _as_views(
        features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=None,
    )
    options = options._replace(block_size=z.shape[0])
    losses, reduction_weight = _scan_blocks(z, labels, valid, options, with_gradient=False)
    shape = (num_samples, num_views)
    return PerAnchorLosses(
        losses=losses.reshape(shape),
        has_positive=(reduction_weight > 0).reshape(shape),
        anchor_weights=reduction_weight.reshape(shape),
    )


def reduce_per_anchor(per_anchor: PerAnchorLosses, axis_name: Hashable | None = None) -> jax.Array:
    """The loss from `per_anchor_losses`: the anchor-weighted mean (0 if no anchor has one)."""
    return _mean_over_anchors(per_anchor.losses, per_anchor.anchor_weights, axis_name)[0]


def pair_weights(
    labels: jax.Array,
    *,
    positives: str = "sd",
    num_views: int = 1,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    jaccard_threshold: float = 0.5,
) -> jax.Array:
    """The weight w_ab each candidate view b gets in anchor view a's positive sum.

    Views are sample-major (view m = n * V + v). Non-positives, the diagonal and padding get 0;
    other views of the anchor's sample get 1. For "mulsupcon" it is the effective weight
    `sum_k [k in y_a, k in y_b] / |P_k(a)|`, which already includes the per-row normalisation.

    Args:
      labels: [N, C] multi-hot or [N] class ids.
      positives: one of `POSITIVES`.
      num_views: V, the views per sample.
      sample_mask: [N] bool.
      label_weights: [C] positive floats.
      jaccard_threshold: in (0, 1].

    Returns:
      [N * V, N * V] float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import pair_weights
      >>> labels = jnp.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
      >>> [[round(float(w), 4) for w in row] for row in pair_weights(labels)]  # 2/3*1/3, 2/4*1/2
      [[0.0, 0.2222], [0.25, 0.0]]
    """
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"`num_views`: got {num_views!r}, expected an int >= 1.")
    dummy_features = jnp.zeros((np.shape(labels)[0], num_views, 1), jnp.float32)
    _, labels, valid, options, _ = _as_views(
        dummy_features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=1.0,
        jaccard_threshold=jaccard_threshold,
        axis_name=None,
        block_size=None,
    )
    candidates, candidate_valid, label_totals = _prepare(labels, valid, options)
    num_views_total = valid.shape[0]
    weights, *_ = _block_weights(
        0,
        num_views_total,
        labels,
        valid,
        candidates,
        candidate_valid,
        label_totals,
        options,
    )
    return weights


def label_relations(labels_a: jax.Array, labels_b: jax.Array | None = None) -> jax.Array:
    """The `Relation` of every candidate's label set to every anchor's label set.

    Args:
      labels_a: [Na, C] multi-hot anchor labels.
      labels_b: [Nb, C] multi-hot candidate labels; defaults to `labels_a`.

    Returns:
      [Na, Nb] int32 `Relation` codes.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import Relation, label_relations
      >>> codes = label_relations(jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]]))
      >>> [Relation(int(c)).name for c in codes[0]]
      ['IDENTICAL', 'SUBSET', 'DISJOINT']
    """
    labels_b = labels_a if labels_b is None else labels_b
    for name, value in (("labels_a", labels_a), ("labels_b", labels_b)):
        if np.ndim(value) != 2:
            raise _shape_error(name, f"shape {np.shape(value)}", "[N, C] multi-hot")
    if np.shape(labels_a)[1] != np.shape(labels_b)[1]:
        raise _shape_error(
            "labels_b", f"shape {np.shape(labels_b)}", f"C = {np.shape(labels_a)[1]} classes"
        )
    anchors = _Labels(jnp.asarray(labels_a, jnp.float32), None)
    candidates = _Labels(jnp.asarray(labels_b, jnp.float32), None)
    shared = anchors.intersection(candidates, weighted=False)
    anchor_size = anchors.cardinality(False)[:, None]
    candidate_size = candidates.cardinality(False)[None, :]
    anchor_inside = shared == anchor_size
    candidate_inside = shared == candidate_size
    return jnp.select(
        [shared == 0, anchor_inside & candidate_inside, candidate_inside, anchor_inside],
        [Relation.DISJOINT, Relation.IDENTICAL, Relation.SUBSET, Relation.SUPERSET],
        Relation.OVERLAP,
    ).astype(jnp.int32)


def labels_from_indices(label_indices: jax.Array, num_classes: int) -> jax.Array:
    """Multi-hot labels from padded label-index lists.

    Args:
      label_indices: [N, L] integer class indices, padded with -1.
      num_classes: C.

    Returns:
      [N, C] float32 multi-hot; repeated indices count once.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import labels_from_indices
      >>> labels_from_indices(jnp.array([[0, 2], [1, -1]]), 3).tolist()
      [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    if np.ndim(label_indices) != 2:
        raise _shape_error("label_indices", f"shape {np.shape(label_indices)}", "[N, L]")
    if not jnp.issubdtype(jnp.result_type(label_indices), jnp.integer):
        raise _shape_error(
            "label_indices", f"dtype {jnp.result_type(label_indices)}", "integer indices"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes`: got {num_classes!r}, expected an int >= 1.")
    one_hot = jax.nn.one_hot(label_indices, num_classes, dtype=jnp.float32)  # -1 -> all zeros
    return jnp.max(one_hot, axis=1)


def make_sharded_loss(
    mesh: jax.sharding.Mesh, axis_name: Hashable = "data", **loss_kwargs: Any
) -> Any:
    """The loss over a batch sharded along `axis_name` of `mesh`: the one right way to scale out.

    Wraps `multilabel_supcon_loss(..., axis_name=axis_name)` in `jax.shard_map`. Call the result
    on global arrays (under `jit`) and take `jax.grad` outside it, around your whole model: the
    gradient is then exactly the single-device gradient on the global batch, with no psum or
    pmean of yours to get wrong.

    Args:
      mesh: a mesh whose axis `axis_name` splits the batch. The batch size must divide evenly;
        pad uneven batches and mark the padding False in `sample_mask`.
      axis_name: the batch axis of `mesh`.
      **loss_kwargs: keyword arguments of `multilabel_supcon_loss`, except `axis_name`.

    Returns:
      `loss(features, labels, sample_mask=None) -> scalar`, replicated.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sdjax.losses import make_sharded_loss
      >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> loss_fn = make_sharded_loss(mesh, positives="sd")
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(jax.jit(loss_fn)(features, labels)), 4)
      0.014
    """
    if "axis_name" in loss_kwargs:
        raise ValueError("`axis_name`: pass it as make_sharded_loss's own argument.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name`: got {axis_name!r}, expected one of {mesh.axis_names}.")
    batch = jax.sharding.PartitionSpec(axis_name)

    def loss_fn(features, labels, sample_mask=None):
        if sample_mask is None:
            sample_mask = jnp.ones((np.shape(features)[0],), bool)
        num_shards = mesh.shape[axis_name]
        if np.shape(features)[0] % num_shards:
            raise ValueError(
                f"`features`: got {np.shape(features)[0]} samples, expected a multiple of the "
                f"{num_shards} shards of mesh axis {axis_name!r}; pad the batch and mark the "
                "padding False in `sample_mask`."
            )
        per_shard = jax.shard_map(
            lambda f, y, m: multilabel_supcon_loss(
                f, y, sample_mask=m, axis_name=axis_name, **loss_kwargs
            ),
            mesh=mesh,
            in_specs=(batch, batch, batch),
            out_specs=jax.sharding.PartitionSpec(),
        )
        return per_shard(features, labels, sample_mask)

    return loss_fn
