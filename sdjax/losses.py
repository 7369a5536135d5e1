"""The Similarity-Dissimilarity (S-D) loss family for multi-label supervised contrastive learning.

Pure, jittable functions of jax and numpy only. The math is `docs/SPEC.md`, which also lists the
points where it decides what the paper leaves open.

Every loss of the family is one weighted-contrastive kernel (`_anchor_block`): logits against the
contrast set, a log-softmax over it, and a weighted sum over positives. Only the pair weights change
with `positives`. The contrast set is the batch's views, or the keys of the query/key form
(`contrast_features`). The kernel runs over row blocks of anchors against the full contrast set,
gathered over `axis_name` when given, so memory stays O(block * M + M * D) for M candidates.
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
    "sd_swapped",
)

# Feature norms are clamped below by this, as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Features with an entry above this are divided by their largest entry before squaring: D * 1e30
# stays finite in float32 for any D < 1e8.
_RESCALE_ABOVE = 1e15
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
    (see `reduce_per_anchor`). `anchor_weights` is how much an anchor counts in that mean (the
    one name for it, here and inside the kernel): `has_positive` as float, except for
    `positives="mulsupcon"`, where it counts the anchor's label rows (a, k) that have a positive
    and `losses` is the mean over those rows.
    """

    losses: jax.Array
    has_positive: jax.Array
    anchor_weights: jax.Array


class _Labels(NamedTuple):
    """Labels of a set of views: multi-hot [M, C] in the compute dtype, or class ids [M] int32
    (-1 = none)."""

    values: jax.Array
    class_weights: jax.Array | None  # [C] in the compute dtype, or None for unit weights

    @property
    def are_ids(self) -> bool:
        return self.values.ndim == 1

    def cardinality(self, weighted: bool) -> jax.Array:
        """|y| for every view: [M] floats."""
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
        """|y_a ∩ y_b| for every anchor a in self and candidate b in other: [Ma, Mb] floats."""
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
    jaccard_threshold: float
    num_views: int
    axis_name: Hashable | None
    block_size: int
    has_keys: bool  # the contrast set is `contrast_features`, not the anchors' views


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _shape_error(name: str, got: Any, expected: str) -> ValueError:
    return ValueError(f"`{name}`: got {got}, expected {expected}.")


def _dtype_error(name: str, got: Any, expected: str) -> TypeError:
    return TypeError(f"`{name}`: got {got}, expected {expected}.")


_ARGUMENTS = ("features", "labels", "sample_mask", "label_weights")
_CONTRAST_ARGUMENTS = (
    "contrast_features",
    "contrast_labels",
    "contrast_mask",
    "contrast_sample_ids",
)


def _as_array_like(x: Any, name: str) -> Any:
    """Python (nested) lists and tuples become numpy arrays; arrays and tracers pass through."""
    if not isinstance(x, (list, tuple)):
        return x
    try:
        return np.asarray(x)
    except ValueError:  # numpy's message says neither which argument nor where
        raise _shape_error(name, "a ragged nested list", "rows of equal length") from None


def _check_int(name: str, value: Any, minimum: int) -> int:
    """A Python or numpy integer >= minimum (not a bool), as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _dtype_error(name, f"{type(value).__name__} {value!r}", f"an int >= {minimum}")
    if value < minimum:
        raise ValueError(f"`{name}`: got {value!r}, expected an int >= {minimum}.")
    return int(value)


def _check_temperature(temperature: Any) -> None:
    """A real number or a 0-d float array > 0; traced values are checked for type only (their
    value is `validate_inputs`'s to check, eagerly)."""
    if isinstance(temperature, (jax.Array, np.ndarray, np.generic)) and not isinstance(
        temperature, np.bool_
    ):
        if np.ndim(temperature) != 0 or not jnp.issubdtype(temperature.dtype, jnp.floating):
            raise _dtype_error(
                "temperature",
                f"an array of shape {np.shape(temperature)} and dtype {temperature.dtype}",
                "a number or a 0-d float array",
            )
        if isinstance(temperature, jax.core.Tracer):
            return  # a schedule or a learned temperature: its value is the caller's
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise _dtype_error(
            "temperature",
            f"{type(temperature).__name__} {temperature!r}",
            "a number or a 0-d float array",
        )
    if not math.isfinite(float(temperature)) or float(temperature) <= 0:
        raise ValueError(f"`temperature`: got {temperature!r}, expected a finite number > 0.")


def _check_options(positives: str, temperature: Any, jaccard_threshold: Any) -> None:
    if positives not in POSITIVES:
        raise ValueError(f"`positives`: got {positives!r}, expected one of {POSITIVES}.")
    _check_temperature(temperature)
    if (
        isinstance(jaccard_threshold, bool)
        or not np.isscalar(jaccard_threshold)
        or not 0 < float(jaccard_threshold) <= 1
    ):
        raise ValueError(
            f"`jaccard_threshold`: got {jaccard_threshold!r}, expected a number in (0, 1]."
        )


def _check_axis_name(axis_name: Hashable | None) -> int:
    """The size of the mapped axis (1 without one); a clear error outside a mapped context."""
    if axis_name is None:
        return 1
    try:
        return jax.lax.axis_size(axis_name)
    except NameError as error:
        raise ValueError(
            f"`axis_name`: got {axis_name!r}, which is not a mapped axis here; expected the "
            "axis of an enclosing `jax.shard_map` or `jax.pmap` (or None on one device). "
            "`make_sharded_loss` does the wrapping."
        ) from error


def _check_features(name: str, features: Any, ranks: tuple[int, ...], expected: str):
    """Checks a feature array's rank, dtype kind and sizes; returns its shape."""
    shape = np.shape(features)
    if len(shape) not in ranks:
        raise _shape_error(name, f"shape {shape}", expected)
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise _dtype_error(name, f"dtype {jnp.result_type(features)}", "a real float dtype")
    if min(shape) < 1:
        raise _shape_error(name, f"shape {shape}", f"{expected} with every size >= 1")
    return shape


def _check_labels(name: str, labels: Any, num_rows: int, rows_from: str) -> tuple[int, ...]:
    shape, dtype = np.shape(labels), jnp.result_type(labels)
    if len(shape) not in (1, 2) or shape[0] != num_rows:
        raise _shape_error(
            name,
            f"shape {shape}",
            f"[{rows_from[0]}, C] multi-hot or [{rows_from[0]}] class ids with "
            f"{rows_from[0]} = {num_rows} (from `{rows_from[1]}`)",
        )
    if len(shape) == 1 and not jnp.issubdtype(dtype, jnp.integer):
        raise _dtype_error(name, f"1-D labels of dtype {dtype}", "integer class ids")
    if not (
        jnp.issubdtype(dtype, jnp.integer)
        or jnp.issubdtype(dtype, jnp.floating)
        or dtype == jnp.bool_
    ):
        raise _dtype_error(name, f"dtype {dtype}", "bool, integer or float 0/1 values")
    return shape


def _check_mask(name: str, mask: Any, num_rows: int, rows_from: str) -> None:
    if mask is None:
        return
    if np.shape(mask) != (num_rows,):
        raise _shape_error(name, f"shape {np.shape(mask)}", f"[{num_rows}] (from `{rows_from}`)")
    if jnp.result_type(mask) != jnp.bool_:
        raise _dtype_error(
            name, f"dtype {jnp.result_type(mask)}", "bool (True = real, False = padding)"
        )


def _check_arrays(
    features: Any, labels: Any, sample_mask: Any, label_weights: Any
) -> tuple[int, int, int]:
    """Checks ranks, shapes and dtype kinds at trace time; returns (N, V, D)."""
    shape = _check_features("features", features, (2, 3), "[N, D] or [N, V, D]")
    num_samples, feature_dim = shape[0], shape[-1]
    num_views = shape[1] if len(shape) == 3 else 1
    labels_shape = _check_labels("labels", labels, num_samples, ("N", "features"))
    _check_mask("sample_mask", sample_mask, num_samples, "features")
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
            raise _dtype_error(
                "label_weights", f"dtype {jnp.result_type(label_weights)}", "positive floats"
            )
    return num_samples, num_views, feature_dim


def validate_inputs(
    features,
    labels,
    *,
    sample_mask=None,
    label_weights=None,
    contrast_features=None,
    contrast_labels=None,
    contrast_mask=None,
    contrast_sample_ids=None,
    temperature=None,
) -> None:
    """Checks the values that `jit` cannot check. Call it eagerly, outside `jit`.

    The losses check shapes and dtypes while tracing; this checks values: multi-hot labels in
    {0, 1}, class ids >= -1, finite features and label weights > 0, and the same for the keys,
    whose `contrast_sample_ids` must lie in [-1, N); and a temperature (the value a traced one
    will have: a schedule's or a learned one's) finite and > 0. (Masks must be bool: the losses
    reject other dtypes, so 0/1 needs no value check.)

    Args:
      features: [N, D] or [N, V, D] floats.
      labels: [N, C] multi-hot or [N] integer class ids (-1 = no label).
      sample_mask: optional [N] bool.
      label_weights: optional [C] positive floats.
      contrast_features, contrast_labels, contrast_mask, contrast_sample_ids: the optional keys
        of the query/key form (see `multilabel_supcon_loss`), for one device's whole batch.
      temperature: optional, a number or a 0-d float array: the value the loss will get.

    Raises:
      ValueError: naming the argument and the first offending entry.
      TypeError: for a wrong dtype kind, as the losses do.
    """
    if temperature is not None:
        _check_temperature(jax.device_get(temperature))  # a concrete value: its value is checked
    features, labels, sample_mask, label_weights = map(
        _as_array_like, (features, labels, sample_mask, label_weights), _ARGUMENTS
    )
    contrast_features, contrast_labels, contrast_mask, contrast_sample_ids = map(
        _as_array_like,
        (contrast_features, contrast_labels, contrast_mask, contrast_sample_ids),
        _CONTRAST_ARGUMENTS,
    )
    num_samples, _, feature_dim = _check_arrays(features, labels, sample_mask, label_weights)
    _check_contrast(
        contrast_features, contrast_labels, contrast_mask, contrast_sample_ids, labels, feature_dim
    )
    _check_values("features", "labels", features, labels, label_weights)
    if contrast_features is not None:
        _check_values(
            "contrast_features",
            "contrast_labels",
            contrast_features,
            contrast_labels,
            label_weights,
        )
    if contrast_sample_ids is not None:
        _check_ids(
            "contrast_sample_ids",
            contrast_sample_ids,
            num_samples,
            f"the index of an anchor sample in [0, {num_samples}), or -1 for none",
        )


def _check_ids(name: str, ids: Any, limit: int, expected: str) -> None:
    """Raises ValueError naming the first of the concrete `ids` outside [-1, limit)."""
    ids = np.asarray(ids)
    bad = np.argwhere((ids < -1) | (ids >= limit))
    if bad.size:
        index = tuple(bad[0].tolist())
        where = index if ids.ndim > 1 else index[0]
        raise ValueError(f"`{name}`: got {ids[index]} at index {where}, expected {expected}.")


def _check_values(features_name, labels_name, features, labels, label_weights) -> None:
    features = np.asarray(jnp.asarray(features, jnp.result_type(jnp.float32, features)))
    bad = np.argwhere(~np.isfinite(features))
    if bad.size:
        raise ValueError(
            f"`{features_name}`: got a non-finite value {features[tuple(bad[0])].item()} at "
            f"index {tuple(bad[0].tolist())}, expected finite values."
        )
    labels = np.asarray(labels)
    if labels.ndim == 2:
        bad = np.argwhere((labels != 0) & (labels != 1))
        if bad.size:
            raise ValueError(
                f"`{labels_name}`: got {labels[tuple(bad[0])].item()!r} at index "
                f"{tuple(bad[0].tolist())}, "
                "expected multi-hot values in {0, 1}."
            )
    else:
        bad = np.argwhere(labels < -1)
        if bad.size:
            raise ValueError(
                f"`{labels_name}`: got class id {labels[tuple(bad[0])]} at index {bad[0][0]}, "
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
                f"`{labels_name}`: got class id {labels.max()}, expected ids < "
                f"{weights.shape[0]} (the length of `label_weights`)."
            )


# --------------------------------------------------------------------------------------------
# Pair weights: the only thing that differs between the members of the family
# --------------------------------------------------------------------------------------------


class _Anchors(NamedTuple):
    """Anchor views: the local batch, or one row block of it."""

    z: jax.Array  # [B, D] L2-normalised, in the compute dtype
    labels: _Labels
    valid: jax.Array  # [B] bool
    view_ids: jax.Array  # [B] int32: global view index n * V + v


class _ContrastSet(NamedTuple):
    """The candidates every anchor is scored against: the batch's views or the keys.

    Built locally, then gathered over `axis_name` (`_gather_contrast`), so that its ids are
    global: `sample_ids` names the global anchor sample a candidate is a view of (-1: none), and
    `view_ids` is the candidate's global view index when the candidates are the anchors
    themselves (-1 for keys, which are never the anchor itself).
    """

    z: jax.Array  # [M, D] L2-normalised
    labels: _Labels
    valid: jax.Array  # [M] bool
    sample_ids: jax.Array  # [M] int32
    view_ids: jax.Array  # [M] int32
    label_totals: jax.Array | None = None  # mulsupcon, multi-hot: valid candidates per class


def _label_weight_block(
    anchors: _Anchors, contrast: _ContrastSet, in_contrast: jax.Array, options: _Options
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pair weights from labels alone, for a block of anchors against all candidates.

    Args:
      anchors: the block's anchor views.
      contrast: the gathered candidates.
      in_contrast: [B, M] bool, the contrast set A(a).
      options: the static settings.

    Returns:
      (weights [B, M], positive [B, M] bool, norm [B]). The anchor's loss is
      -sum_b weights * log_softmax / norm, where norm is |P(a)| or, for mulsupcon, the number of
      the anchor's label rows with a positive.
    """
    positives = options.positives
    dtype = anchors.z.dtype
    anchor_labels, candidate_labels = anchors.labels, contrast.labels
    if positives == "mulsupcon":
        if anchor_labels.are_ids:
            same_class = anchor_labels.intersection(candidate_labels, weighted=False) * in_contrast
            per_class_positives = jnp.sum(same_class, axis=1)  # |P_k(a)| for k = y_a
            has_rows = per_class_positives > 0
            weights = same_class / jnp.where(has_rows, per_class_positives, 1.0)[:, None]
            return weights, weights > 0, has_rows.astype(dtype)
        # |P_k(a)|: valid candidates with label k, less the anchor itself when it is one of them.
        per_class_positives = contrast.label_totals[None, :]
        if not options.has_keys:
            per_class_positives = (
                per_class_positives - anchor_labels.values * anchors.valid[:, None]
            )
        row_scale = jnp.where(
            per_class_positives > 0,
            anchor_labels.values / jnp.maximum(per_class_positives, 1.0),
            0.0,
        )
        weights = jnp.dot(row_scale, candidate_labels.values.T, precision=_EXACT) * in_contrast
        # Padding anchors have no rows: their weights are already masked by `in_contrast`.
        num_rows = jnp.sum(anchor_labels.values * (per_class_positives > 0), axis=1)
        return weights, weights > 0, num_rows * anchors.valid

    shared = anchor_labels.intersection(candidate_labels, weighted=False)
    positive = shared > 0
    if positives == "any":
        weights = positive.astype(dtype)
    elif positives == "all":
        positive = (
            positive
            & (shared == anchor_labels.cardinality(False)[:, None])
            & (shared == candidate_labels.cardinality(False)[None, :])
        )
        weights = positive.astype(dtype)
    else:
        weighted = anchor_labels.class_weights is not None
        shared_w = (
            anchor_labels.intersection(candidate_labels, weighted=True) if weighted else shared
        )
        anchor_size = anchor_labels.cardinality(True)[:, None]
        candidate_size = candidate_labels.cardinality(True)[None, :]
        tiny = jnp.finfo(dtype).tiny  # the sizes are 0 only where there is no positive
        if positives == "sd_swapped":  # the factors' roles swapped, as ws-MulSupCon computes
            similarity = shared_w / jnp.maximum(candidate_size, tiny)
            dissimilarity = 1.0 / (1.0 + anchor_size - shared_w)
        else:
            similarity = shared_w / jnp.maximum(anchor_size, tiny)  # K_s
            dissimilarity = 1.0 / (1.0 + candidate_size - shared_w)  # K_d
        if positives in ("sd", "sd_swapped"):
            weights = similarity * dissimilarity
        elif positives == "sd_similarity_only":
            weights = similarity
        elif positives == "sd_dissimilarity_only":
            weights = dissimilarity
        else:  # jaccard
            union = anchor_size + candidate_size - shared_w
            jaccard = shared_w / jnp.maximum(union, tiny)
            positive = positive & (jaccard >= options.jaccard_threshold)
            weights = jaccard
        weights = jnp.where(positive, weights, 0.0)
    positive = positive & in_contrast
    weights = weights * in_contrast
    return weights, positive, positive.sum(axis=1).astype(dtype)


def _block_weights(
    anchors: _Anchors, contrast: _ContrastSet, options: _Options
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Weights, contrast mask, per-anchor normaliser and `anchor_weights` of a block of anchors.

    The ids recognise the anchor itself (b = a, excluded) and the other views of the anchor's
    sample (same(a, b): positive, weight 1).
    """
    not_self = anchors.view_ids[:, None] != contrast.view_ids[None, :]
    in_contrast = not_self & contrast.valid[None, :] & anchors.valid[:, None]
    weights, positive, norm = _label_weight_block(anchors, contrast, in_contrast, options)
    if options.positives != "mulsupcon" and (options.has_keys or options.num_views > 1):
        anchor_samples = anchors.view_ids // options.num_views
        same_sample = in_contrast & (anchor_samples[:, None] == contrast.sample_ids[None, :])
        norm = norm + jnp.sum(same_sample & ~positive, axis=1)
        weights = jnp.where(same_sample, 1.0, weights)
    if options.positives == "mulsupcon":
        anchor_weights = norm  # the anchor's label rows that have a positive
    else:
        anchor_weights = (norm > 0).astype(norm.dtype)
    return weights, in_contrast, jnp.maximum(norm, 1.0), anchor_weights


# --------------------------------------------------------------------------------------------
# The weighted-contrastive kernel
# --------------------------------------------------------------------------------------------


class _BlockGradients(NamedTuple):
    """What the fused backward pass needs from one block (all of sum_a anchor_weights_a * l_a)."""

    dlogits: jax.Array  # [B, M] gradient w.r.t. the logits s_ab
    logit_moment: jax.Array  # scalar sum_ab dlogits_ab * s_ab, for the temperature gradient


def _anchor_block(
    anchors: _Anchors,
    contrast: _ContrastSet,
    temperature: jax.Array,
    options: _Options,
    with_gradient: bool,
):
    """Loss terms of a block of anchors against every candidate.

    Returns per-anchor losses [B] and `anchor_weights` [B]; with `with_gradient`, also the
    block's `_BlockGradients`.
    """
    weights, in_contrast, norm, anchor_weights = _block_weights(anchors, contrast, options)
    logits = jnp.dot(anchors.z, contrast.z.T) / temperature
    masked = jnp.where(in_contrast, logits, -jnp.inf)
    # The shift only keeps exp in range; it cancels in value and gradient.
    shift = jax.lax.stop_gradient(jnp.max(masked, axis=1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    # exp(-inf) = 0 outside the contrast set keeps the diagonal from overflowing (and NaN grads).
    exp_logits = jnp.exp(jnp.where(in_contrast, logits - shift, -jnp.inf))
    sum_exp = jnp.maximum(jnp.sum(exp_logits, axis=1, keepdims=True), 1e-30)
    log_normaliser = shift + jnp.log(sum_exp)
    total_weight = jnp.sum(weights, axis=1, keepdims=True)
    # -sum_b w_ab (s_ab - log sum_c exp s_ac): written so that masked logits never meet a weight.
    in_contrast_logits = jnp.where(in_contrast, logits, 0.0)
    weighted_logits = jnp.sum(weights * in_contrast_logits, axis=1, keepdims=True)
    losses = ((total_weight * log_normaliser - weighted_logits) / norm[:, None])[:, 0]
    if not with_gradient:
        return losses, anchor_weights
    scale = (anchor_weights / norm)[:, None]
    dlogits = scale * (total_weight * exp_logits / sum_exp - weights)
    return losses, anchor_weights, _BlockGradients(dlogits, jnp.sum(dlogits * in_contrast_logits))


def _normalize(features: jax.Array, dtype: Any) -> jax.Array:
    """x / max(||x||, eps), in `dtype`, for any finite norm: large vectors are first divided by
    their largest entry (which cancels exactly), so that squaring them cannot overflow."""
    features = features.astype(dtype)
    largest = jnp.max(jnp.abs(features), axis=-1, keepdims=True)
    # Only norms whose squares could overflow are rescaled: others keep their exact rounding.
    scale = jax.lax.stop_gradient(jnp.where(largest > _RESCALE_ABOVE, largest, 1.0))
    scaled = features / scale
    squared_norm = jnp.sum(scaled * scaled, axis=-1, keepdims=True)
    # When scale > 1 the scaled norm is >= 1, so the clamp (eps / scale)^2 may underflow to 0.
    return scaled * jax.lax.rsqrt(jnp.maximum(squared_norm, (_NORM_EPS / scale) ** 2))


def _gather(x: jax.Array, axis_name: Hashable | None) -> jax.Array:
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def _global_offset(num_local: int, axis_name: Hashable | None) -> jax.Array | int:
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * num_local


def _gather_contrast(local: _ContrastSet, options: _Options) -> _ContrastSet:
    """The global contrast set, and mulsupcon's per-class counts of its valid candidates."""
    gather = lambda x: _gather(x, options.axis_name)
    gathered = local._replace(
        z=gather(local.z),
        labels=local.labels._replace(values=gather(local.labels.values)),  # not class_weights
        valid=gather(local.valid),
        sample_ids=gather(local.sample_ids),
        view_ids=gather(local.view_ids),
    )
    if options.positives == "mulsupcon" and not gathered.labels.are_ids:
        label_totals = jnp.sum(gathered.labels.values * gathered.valid[:, None], axis=0)
        gathered = gathered._replace(label_totals=label_totals)
    return gathered


def _local_contrast(anchors: _Anchors, keys: _ContrastSet | None, options: _Options):
    """This device's part of the contrast set: its keys, or else its anchor views."""
    if keys is not None:
        return keys
    return _ContrastSet(
        z=anchors.z,
        labels=anchors.labels,
        valid=anchors.valid,
        sample_ids=anchors.view_ids // options.num_views,
        view_ids=anchors.view_ids,
    )


def _padded_blocks(num_rows: int, block_size: int) -> tuple[int, int]:
    num_blocks = -(-num_rows // block_size)
    return num_blocks, num_blocks * block_size - num_rows


def _pad_rows(x: jax.Array, pad: int, value=0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


class _KernelGradients(NamedTuple):
    """Gradients of sum_a anchor_weights_a * l_a (over this device's anchors)."""

    anchor_z: jax.Array  # [M_local, D]: as anchors, plus as candidates without keys
    key_z: jax.Array | None  # [M_keys_local, D] with keys
    temperature: jax.Array  # scalar: this device's anchors' share


def _scan_blocks(anchors, keys, temperature, options, with_gradient):
    """Runs the kernel over row blocks of the local anchors against the gathered contrast set.

    Returns (losses [M_local], anchor_weights [M_local]) and, with `with_gradient`, the
    `_KernelGradients`.
    """
    num_local = anchors.z.shape[0]
    block_size = options.block_size
    num_blocks, pad = _padded_blocks(num_local, block_size)
    contrast = _gather_contrast(_local_contrast(anchors, keys, options), options)
    padded = _Anchors(
        z=_pad_rows(anchors.z, pad),
        labels=anchors.labels._replace(
            values=_pad_rows(anchors.labels.values, pad, -1 if anchors.labels.are_ids else 0)
        ),
        valid=_pad_rows(anchors.valid, pad, False),
        view_ids=_pad_rows(anchors.view_ids, pad, -1),
    )

    inv_temperature = 1.0 / temperature

    def block(carry, block_index):
        start = block_index * block_size
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, block_size)
        block_anchors = _Anchors(
            z=take(padded.z),
            labels=padded.labels._replace(values=take(padded.labels.values)),
            valid=take(padded.valid),
            view_ids=take(padded.view_ids),
        )
        outputs = _anchor_block(block_anchors, contrast, temperature, options, with_gradient)
        if not with_gradient:
            return carry, outputs
        losses, anchor_weights, gradients = outputs
        anchor_grad = jnp.dot(gradients.dlogits, contrast.z) * inv_temperature
        contrast_grad, logit_moment = carry
        carry = (
            contrast_grad + jnp.dot(gradients.dlogits.T, block_anchors.z) * inv_temperature,
            logit_moment + gradients.logit_moment,
        )
        return carry, (losses, anchor_weights, anchor_grad)

    init = None
    if with_gradient:
        # Zeros shaped like what they accumulate, so that they vary over `axis_name` as it does.
        init = (jnp.zeros_like(contrast.z), jnp.zeros_like(anchors.z[0, 0]))
    if num_blocks == 1:
        carry, stacked = block(init, 0)
        stacked = jax.tree.map(lambda x: x[None], stacked)
    else:
        carry, stacked = jax.lax.scan(block, init, jnp.arange(num_blocks))
    stacked = jax.tree.map(lambda x: x.reshape((num_blocks * block_size, *x.shape[2:])), stacked)
    stacked = jax.tree.map(lambda x: x[:num_local], stacked)
    if not with_gradient:
        return stacked
    losses, anchor_weights, anchor_grad = stacked
    contrast_grad, logit_moment = carry
    if options.axis_name is not None:
        # Every device scored its own anchors against everyone's candidates: send each
        # candidate's share of the gradient back to the device that owns it.
        contrast_grad = jax.lax.psum_scatter(contrast_grad, options.axis_name, tiled=True)
    # L depends on tau only through s = z.z'/tau, so dL/dtau = -(1/tau) sum_ab dL/ds_ab s_ab.
    temperature_grad = -logit_moment / temperature
    if keys is None:
        gradients = _KernelGradients(anchor_grad + contrast_grad, None, temperature_grad)
    else:
        gradients = _KernelGradients(anchor_grad, contrast_grad, temperature_grad)
    return losses, anchor_weights, gradients


def _psum(x, axis_name):
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _mean_over_anchors(losses, anchor_weights, axis_name):
    total = _psum(jnp.sum(anchor_weights * losses), axis_name)
    count = _psum(jnp.sum(anchor_weights), axis_name)
    return total / jnp.maximum(count, 1.0), count


def _fused_loss_primal(anchors, keys, temperature, options):
    losses, anchor_weights = _scan_blocks(anchors, keys, temperature, options, False)
    return _mean_over_anchors(losses, anchor_weights, options.axis_name)[0]


def _fused_loss_fwd(anchors, keys, temperature, options):
    # One pass yields the loss and its gradients, so the backward pass recomputes nothing.
    losses, anchor_weights, gradients = _scan_blocks(anchors, keys, temperature, options, True)
    loss, count = _mean_over_anchors(losses, anchor_weights, options.axis_name)
    gradients = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), gradients)
    return loss, (gradients, _zero_cotangents((anchors, keys)))


def _fused_loss_bwd(options, residuals, cotangent):
    gradients, (anchors, keys) = residuals
    scaled = jax.tree.map(lambda g: cotangent * g, gradients)
    anchors = anchors._replace(z=scaled.anchor_z)
    if keys is not None:
        keys = keys._replace(z=scaled.key_z)
    return anchors, keys, scaled.temperature


def _zero_cotangents(tree):
    def zero(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, dtype=jax.dtypes.float0)

    return jax.tree.map(zero, tree)


_fused_loss = jax.custom_vjp(_fused_loss_primal, nondiff_argnums=(3,))
_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_contrast(
    contrast_features, contrast_labels, contrast_mask, contrast_sample_ids, labels, feature_dim
) -> None:
    """Checks the keys of the query/key form against the anchors' labels and feature size."""
    if contrast_features is None:
        for name, value in (
            ("contrast_labels", contrast_labels),
            ("contrast_mask", contrast_mask),
            ("contrast_sample_ids", contrast_sample_ids),
        ):
            if value is not None:
                raise ValueError(f"`{name}`: given without `contrast_features`.")
        return
    if contrast_labels is None:
        raise ValueError(
            "`contrast_labels`: None, expected the keys' labels with `contrast_features`."
        )
    shape = _check_features("contrast_features", contrast_features, (2,), "[M, D]")
    num_keys = shape[0]
    if shape[1] != feature_dim:
        raise _shape_error(
            "contrast_features",
            f"shape {shape}",
            f"[M, D] with D = {feature_dim} (from `features`)",
        )
    labels_shape = np.shape(labels)
    key_labels_shape = _check_labels(
        "contrast_labels", contrast_labels, num_keys, ("M", "contrast_features")
    )
    if len(key_labels_shape) != len(labels_shape) or key_labels_shape[1:] != labels_shape[1:]:
        expected = "[M] class ids" if len(labels_shape) == 1 else f"[M, {labels_shape[1]}]"
        raise _shape_error(
            "contrast_labels", f"shape {key_labels_shape}", f"{expected}, the form of `labels`"
        )
    _check_mask("contrast_mask", contrast_mask, num_keys, "contrast_features")
    if contrast_sample_ids is not None:
        if np.shape(contrast_sample_ids) != (num_keys,):
            raise _shape_error(
                "contrast_sample_ids",
                f"shape {np.shape(contrast_sample_ids)}",
                f"[{num_keys}] (from `contrast_features`)",
            )
        if not jnp.issubdtype(jnp.result_type(contrast_sample_ids), jnp.integer):
            raise _dtype_error(
                "contrast_sample_ids",
                f"dtype {jnp.result_type(contrast_sample_ids)}",
                "integer sample indices (-1 = a view of no anchor sample)",
            )


def _label_values(labels: Any, num_views: int, dtype: Any) -> jax.Array:
    """Per-view label values: int32 class ids, or multi-hot in the compute dtype."""
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        return jnp.repeat(labels.astype(jnp.int32), num_views)
    return jnp.repeat(labels.astype(dtype), num_views, axis=0)


def _prepare(
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
    contrast_features=None,
    contrast_labels=None,
    contrast_mask=None,
    contrast_sample_ids=None,
):
    """Checks the inputs and builds the kernel's operands: sample-major anchor views
    (view m = n * V + v), the local keys (or None), the temperature and the static options."""
    features, labels, sample_mask, label_weights = map(
        _as_array_like, (features, labels, sample_mask, label_weights), _ARGUMENTS
    )
    contrast_features, contrast_labels, contrast_mask, contrast_sample_ids = map(
        _as_array_like,
        (contrast_features, contrast_labels, contrast_mask, contrast_sample_ids),
        _CONTRAST_ARGUMENTS,
    )
    _check_options(positives, temperature, jaccard_threshold)
    num_samples, num_views, feature_dim = _check_arrays(
        features, labels, sample_mask, label_weights
    )
    _check_contrast(
        contrast_features, contrast_labels, contrast_mask, contrast_sample_ids, labels, feature_dim
    )
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    num_shards = _check_axis_name(axis_name)
    has_keys = contrast_features is not None

    # float32 is the floor (bf16/f16 compute in float32); float64 stays float64 under x64.
    dtypes = [jnp.result_type(features)]
    if has_keys:
        dtypes.append(jnp.result_type(contrast_features))
    dtype = jnp.result_type(jnp.float32, *dtypes)
    if label_weights is not None:
        label_weights = jnp.asarray(label_weights, dtype)

    num_local_views = num_samples * num_views
    valid = jnp.ones((num_local_views,), bool)
    if sample_mask is not None:
        valid = jnp.repeat(jnp.asarray(sample_mask), num_views)
    anchors = _Anchors(
        z=_normalize(jnp.reshape(features, (num_local_views, feature_dim)), dtype),
        labels=_Labels(_label_values(labels, num_views, dtype), label_weights),
        valid=valid,
        view_ids=_global_offset(num_local_views, axis_name)
        + jnp.arange(num_local_views, dtype=jnp.int32),
    )
    keys = None
    num_candidates = num_local_views * num_shards
    if has_keys:
        num_keys = np.shape(contrast_features)[0]
        num_candidates = num_keys * num_shards
        keys = _ContrastSet(
            z=_normalize(contrast_features, dtype),
            labels=_Labels(_label_values(contrast_labels, 1, dtype), label_weights),
            valid=(
                jnp.ones((num_keys,), bool) if contrast_mask is None else jnp.asarray(contrast_mask)
            ),
            sample_ids=(
                jnp.full((num_keys,), -1, jnp.int32)
                if contrast_sample_ids is None
                else jnp.asarray(contrast_sample_ids).astype(jnp.int32)
            ),
            view_ids=jnp.full((num_keys,), -1, jnp.int32),
        )
    if block_size is None:
        budget = _AUTO_BLOCK_ELEMENTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
        block_size = max(8, budget // max(num_candidates, 1))
    options = _Options(
        positives=positives,
        jaccard_threshold=float(jaccard_threshold),
        num_views=num_views,
        axis_name=axis_name,
        block_size=min(block_size, num_local_views),
        has_keys=has_keys,
    )
    temperature = jnp.asarray(temperature, dtype)
    if axis_name is not None:
        # A varying temperature makes each device's dL/dtau its own anchors' share, which the
        # transpose of this cast sums over devices (a replicated parameter's rule).
        temperature = _varying(temperature, axis_name)
    return anchors, keys, temperature, options, (num_samples, num_views)


def _varying(x: jax.Array, axis_name: Hashable) -> jax.Array:
    try:
        return jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # already varying
        return x


def multilabel_supcon_loss(
    features: jax.Array,
    labels: jax.Array,
    *,
    positives: str = "sd",
    temperature: float | jax.Array = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    contrast_features: jax.Array | None = None,
    contrast_labels: jax.Array | None = None,
    contrast_mask: jax.Array | None = None,
    contrast_sample_ids: jax.Array | None = None,
) -> jax.Array:
    """Multi-label supervised contrastive loss with a choice of positives and pair weights.

    Every view is an anchor; its contrast set is every other valid view in the (global) batch,
    or, in the query/key form, the valid keys `contrast_features`. The loss is the mean over
    anchors that have a positive of
    `-(1/|P(a)|) sum_{b in P(a)} w_ab log softmax_{c in A(a)}(s_ac)[b]`, with `s = z_a . z_b / tau`
    on L2-normalised features. `positives` chooses P(a) and w (docs/SPEC.md):

    * `"sd"`: shared label; w = K_s * K_d (the Similarity-Dissimilarity loss), with
      K_s = |y_a ∩ y_b| / |y_a| and K_d = 1 / (1 + |y_b \\ y_a|).
    * `"all"`: identical non-empty label sets; w = 1.
    * `"any"`: shared label; w = 1.
    * `"jaccard"`: Jaccard index >= `jaccard_threshold`; w = Jaccard index.
    * `"mulsupcon"`: one row per (anchor, anchor label k); positives carry k; mean over rows.
    * `"sd_similarity_only"` / `"sd_dissimilarity_only"`: ablations, w = K_s / w = K_d.
    * `"sd_swapped"`: shared label; the factors' roles swapped, w = |y_a ∩ y_b| / |y_b| *
      1 / (1 + |y_a \\ y_b|), which is what ws-MulSupCon computes.

    Two views of one sample are always positives of weight 1 (mulsupcon: through their labels).

    Args:
      features: [N, D] or [N, V, D] embeddings (any float dtype). Normalised here.
      labels: [N, C] multi-hot (bool, int or float 0/1) or [N] integer class ids, where -1 means
        no label. Class ids are single-label, and "sd", "all" and "any" then equal SupCon.
        Arrays or (nested) Python lists.
      positives: one of `POSITIVES`.
      temperature: a number > 0, or a 0-d float JAX array (it may be traced: a schedule, or a
        learned temperature, which gets its gradient dL/dtau). A traced value must be finite
        and > 0, which `jit` cannot check: `validate_inputs(..., temperature=tau)` does.
      sample_mask: [N] bool; False marks padding, which is neither anchor nor candidate.
      label_weights: [C] positive floats: |S| = sum of the weights of S's labels. Used by "sd",
        its ablations, "sd_swapped" and "jaccard"; the other choices use no cardinalities.
      jaccard_threshold: in (0, 1]; used by "jaccard".
      axis_name: inside `jax.shard_map` or `jax.pmap`, the axis over which the batch is split.
        The local samples are the anchors, the contrast set is the global batch (or all keys),
        and the result is the global loss on every device. Its gradient w.r.t. the local
        features is the matching slice of the single-device gradient. Easiest:
        `make_sharded_loss`, with `jax.grad` taken outside. Inside `shard_map`, the gradient of
        a replicated (P()) parameter already arrives summed over devices: do not psum it again.
        Inside `pmap`, each device gets its samples' share: `jax.lax.psum` it (pmean would be
        1/N too small). The same holds for a learned temperature.
      block_size: anchor views per row block (an int, numpy ints included). None (default)
        picks blocks of about 4M logits on a CPU and 64M on a GPU or TPU, so memory is
        O(block * M + M * D) at any batch size, M the number of candidates. Any value gives the
        same result.
      contrast_features: optional [M, D] keys (the query/key form, as in MoCo and MulSupCon's
        trainer). When given, the anchors are the views of `features` and the contrast set is
        these M keys only: the anchors themselves are not candidates. Normalised here, and
        differentiable (apply `jax.lax.stop_gradient` yourself for momentum-encoder keys).
      contrast_labels: [M, C] multi-hot (or [M] class ids when `labels` are ids): the keys'
        labels. Required with `contrast_features`.
      contrast_mask: optional [M] bool; False marks padding keys, which are never candidates.
      contrast_sample_ids: optional [M] integer: the index of the anchor sample each key is a
        view of, -1 for none (queue entries, the default for every key). A key of the anchor's
        own sample is a positive of weight 1 (mulsupcon: through its labels, as in-batch). With
        `axis_name` the keys are sharded like the batch and gathered, and the ids count samples
        in the global batch (device d's local sample n is d * N_local + n).
    Returns:
      A scalar in the compute dtype: float32, or float64 for float64 inputs under
      `jax_enable_x64`. 0 (with zero gradient) when no anchor has a positive.

    Raises:
      ValueError: at trace time, for a wrong shape or rank, zero samples, `temperature <= 0`,
        an unknown `positives`, `jaccard_threshold` outside (0, 1], `label_weights` of the wrong
        length, or an `axis_name` that is not a mapped axis here. Value checks that `jit`
        cannot do are in `validate_inputs`.
      TypeError: for a wrong dtype kind (integer features, float class ids, a non-bool mask,
        non-float label weights, a bool, string or integer-array temperature), as optax does.

    References:
      Huang, Long, Luo, "Similarity-Dissimilarity Loss for Multi-label Supervised Contrastive
      Learning", arXiv:2410.13439. Khosla et al., "Supervised Contrastive Learning", 2020.
      Zhang and Wu, "Multi-Label Supervised Contrastive Learning", AAAI 2024.
      He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", 2020.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sdjax.losses import multilabel_supcon_loss
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(multilabel_supcon_loss(features, labels, positives="any")), 4)
      0.0279
      >>> keys = jnp.array([[0.9, 0.1], [0.0, 1.0]])  # e.g. a momentum encoder's, or a queue
      >>> key_labels = jnp.array([[1, 0, 0], [0, 0, 1]])
      >>> loss = multilabel_supcon_loss(
      ...     features, labels, contrast_features=keys, contrast_labels=key_labels,
      ...     contrast_sample_ids=jnp.array([1, -1]))  # key 0 is a view of sample 1
      >>> round(float(loss), 4)
      0.0079
    """
    anchors, keys, temperature, options, _ = _prepare(
        features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=block_size,
        contrast_features=contrast_features,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )
    return _fused_loss(anchors, keys, temperature, options)


def similarity_dissimilarity_loss(
    features: jax.Array,
    labels: jax.Array,
    *,
    temperature: float | jax.Array = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    contrast_features: jax.Array | None = None,
    contrast_labels: jax.Array | None = None,
    contrast_mask: jax.Array | None = None,
    contrast_sample_ids: jax.Array | None = None,
) -> jax.Array:
    """The Similarity-Dissimilarity (S-D) loss: `multilabel_supcon_loss(positives="sd")`.

    A candidate b sharing a label with anchor a is a positive of weight
    `w_ab = K_s * K_d = (|y_a ∩ y_b| / |y_a|) * 1 / (1 + |y_b \\ y_a|)`.

    Args:
      features: [N, D] or [N, V, D] embeddings (normalised here).
      labels: [N, C] multi-hot or [N] integer class ids (-1 = no label).
      temperature: a number > 0 or a 0-d float array (may be traced).
      sample_mask: [N] bool; False marks padding.
      label_weights: [C] positive floats for weighted cardinalities.
      axis_name: the mapped axis to gather the contrast set over (see `multilabel_supcon_loss`).
      block_size: anchor views per row block; None picks one.
      contrast_features, contrast_labels, contrast_mask, contrast_sample_ids: the optional keys
        of the query/key form (see `multilabel_supcon_loss`).

    Returns:
      A scalar (float32, or float64 for float64 inputs under x64).

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
        contrast_features=contrast_features,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )


def per_anchor_losses(
    features: jax.Array,
    labels: jax.Array,
    *,
    positives: str = "sd",
    temperature: float | jax.Array = 0.07,
    sample_mask: jax.Array | None = None,
    label_weights: jax.Array | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
    contrast_features: jax.Array | None = None,
    contrast_labels: jax.Array | None = None,
    contrast_mask: jax.Array | None = None,
    contrast_sample_ids: jax.Array | None = None,
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
    anchors, keys, temperature, options, shape = _prepare(
        features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=None,
        contrast_features=contrast_features,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )
    options = options._replace(block_size=anchors.z.shape[0])
    losses, anchor_weights = _scan_blocks(anchors, keys, temperature, options, False)
    return PerAnchorLosses(
        losses=losses.reshape(shape),
        has_positive=(anchor_weights > 0).reshape(shape),
        anchor_weights=anchor_weights.reshape(shape),
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
    contrast_labels: jax.Array | None = None,
    contrast_mask: jax.Array | None = None,
    contrast_sample_ids: jax.Array | None = None,
) -> jax.Array:
    """The weight w_ab each candidate b gets in anchor view a's positive sum.

    Views are sample-major (view m = n * V + v). Non-positives, the diagonal and padding get 0;
    other views of the anchor's sample get 1. For "mulsupcon" it is the effective weight
    `sum_k [k in y_a, k in y_b] / |P_k(a)|`, which already includes the per-row normalisation.
    With `contrast_labels`, the candidates are the M keys of the query/key form.

    Args:
      labels: [N, C] multi-hot or [N] class ids.
      positives: one of `POSITIVES`.
      num_views: V, the views per sample.
      sample_mask: [N] bool.
      label_weights: [C] positive floats.
      jaccard_threshold: in (0, 1].
      contrast_labels: optional [M, C] (or [M]) labels of the keys.
      contrast_mask: optional [M] bool, False for padding keys.
      contrast_sample_ids: optional [M] integer, the anchor sample each key is a view of (-1:
        none).

    Returns:
      [N * V, N * V] float32, or [N * V, M] with keys.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import pair_weights
      >>> labels = jnp.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]])
      >>> [[round(float(w), 4) for w in row] for row in pair_weights(labels)]  # 2/3*1/3, 2/4*1/2
      [[0.0, 0.2222], [0.25, 0.0]]
      >>> [round(float(w), 4) for w in pair_weights(labels, positives="sd_swapped")[0]]
      [0.0, 0.25]
    """
    num_views = _check_int("num_views", num_views, 1)
    labels, contrast_labels = map(
        _as_array_like, (labels, contrast_labels), ("labels", "contrast_labels")
    )
    dummy_features = jnp.zeros((np.shape(labels)[0], num_views, 1), jnp.float32)
    dummy_keys = None
    if contrast_labels is not None:
        dummy_keys = jnp.zeros((np.shape(contrast_labels)[0], 1), jnp.float32)
    anchors, keys, _, options, _ = _prepare(
        dummy_features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=1.0,
        jaccard_threshold=jaccard_threshold,
        axis_name=None,
        block_size=None,
        contrast_features=dummy_keys,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )
    contrast = _gather_contrast(_local_contrast(anchors, keys, options), options)
    weights, *_ = _block_weights(anchors, contrast, options)
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
      label_indices: [N, L] integer class ids in [0, C), padded with -1.
      num_classes: C, an int (numpy ints included).

    Returns:
      [N, C] float32 multi-hot; repeated indices count once. An id outside [-1, C) is never
      dropped: it raises ValueError when the ids are known (outside `jit`), and under `jit`,
      where they are not, its sample's row is NaN, which `validate_inputs` reports and which
      makes the loss NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import labels_from_indices
      >>> labels_from_indices(jnp.array([[0, 2], [1, -1]]), 3).tolist()
      [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    label_indices = _as_array_like(label_indices, "label_indices")
    if np.ndim(label_indices) != 2:
        raise _shape_error("label_indices", f"shape {np.shape(label_indices)}", "[N, L]")
    if not jnp.issubdtype(jnp.result_type(label_indices), jnp.integer):
        raise _dtype_error(
            "label_indices", f"dtype {jnp.result_type(label_indices)}", "integer class ids"
        )
    num_classes = _check_int("num_classes", num_classes, 1)
    if not isinstance(label_indices, jax.core.Tracer):
        _check_ids(
            "label_indices",
            label_indices,
            num_classes,
            f"class ids in [0, {num_classes}), or -1 for padding",
        )
    label_indices = jnp.asarray(label_indices)
    out_of_range = (label_indices < -1) | (label_indices >= num_classes)
    one_hot = jax.nn.one_hot(label_indices, num_classes, dtype=jnp.float32)  # -1 -> all zeros
    return jnp.where(out_of_range.any(axis=1, keepdims=True), jnp.nan, jnp.max(one_hot, axis=1))


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
      **loss_kwargs: keyword arguments of `multilabel_supcon_loss`, except `axis_name` and the
        per-batch arrays (`sample_mask` and the keys), which are the returned function's.

    Returns:
      `loss(features, labels, sample_mask=None, *, contrast_features=None,
      contrast_labels=None, contrast_mask=None, contrast_sample_ids=None, temperature=None)
      -> scalar`, replicated. Keys are sharded along `axis_name` like the batch (their count
      must divide evenly too) and `contrast_sample_ids` index the global batch. A `temperature`
      given here (a replicated scalar, e.g. a learned one) replaces the one in `loss_kwargs`.

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
    per_batch = ("axis_name", "sample_mask", *_KEY_ARGUMENTS)
    for name in per_batch:
        if name in loss_kwargs:
            raise ValueError(f"`{name}`: pass it to the returned loss function, not here.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name`: got {axis_name!r}, expected one of {mesh.axis_names}.")
    batch = jax.sharding.PartitionSpec(axis_name)
    num_shards = mesh.shape[axis_name]

    def loss_fn(features, labels, sample_mask=None, *, temperature=None, **keys):
        unknown = set(keys) - set(_KEY_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}.")
        if sample_mask is None:
            sample_mask = jnp.ones((np.shape(features)[0],), bool)
        for name, value in (("features", features), *keys.items()):
            if value is not None and np.shape(value)[0] % num_shards:
                rows, mask = ("samples", "`sample_mask`")
                if name != "features":
                    rows, mask = ("keys", "`contrast_mask`")
                raise ValueError(
                    f"`{name}`: got {np.shape(value)[0]} {rows}, expected a multiple of the "
                    f"{num_shards} shards of mesh axis {axis_name!r}; pad the batch and mark the "
                    f"padding False in {mask}."
                )
        if temperature is None:
            temperature = loss_kwargs.get("temperature", 0.07)
        kwargs = {k: v for k, v in loss_kwargs.items() if k != "temperature"}
        key_names = [k for k in _KEY_ARGUMENTS if keys.get(k) is not None]
        # A traced temperature enters replicated; a Python number stays a compile-time constant.
        traced_temperature = isinstance(temperature, jax.Array)
        operands = (features, labels, sample_mask, *(keys[k] for k in key_names))
        specs = (batch,) * len(operands)
        if traced_temperature:
            operands, specs = (*operands, temperature), (*specs, jax.sharding.PartitionSpec())

        def body(f, y, m, *rest):
            tau = rest[-1] if traced_temperature else temperature
            key_values = dict(zip(key_names, rest[: len(key_names)], strict=True))
            return multilabel_supcon_loss(
                f, y, sample_mask=m, temperature=tau, axis_name=axis_name, **key_values, **kwargs
            )

        per_shard = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=jax.sharding.PartitionSpec()
        )
        return per_shard(*operands)

    return loss_fn


_KEY_ARGUMENTS = ("contrast_features", "contrast_labels", "contrast_mask", "contrast_sample_ids")
