"""Label arithmetic and pair weights: the only thing that differs between the members of the
family. Label sets are compared once per pair of samples (not of views)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdjax.losses._checks import _as_array_like, _check_ids, _check_int
from sdjax.losses._types import LabelIndices, Relation, _dtype_error, _Options, _shape_error

# Index lists compare each anchor slot with up to this many candidate slots in one fused pass.
_UNROLLED_SLOTS = 64
# Unweighted index-list counts fuse up to this many slot comparisons in one pass.
_UNROLLED_PAIRS = 256
# Label intersections must be exact integers on every backend (TPUs default to bf16 passes).
_EXACT = jax.lax.Precision.HIGHEST


class _Labels(NamedTuple):
    """Label sets of samples (or keys) and their sizes.

    `values` is multi-hot [S, C] in the compute dtype, or index lists [S, K] int32 (class ids
    are lists of one), with -1 in empty slots and no id twice in a row.
    """

    values: jax.Array
    sizes: jax.Array  # [S] |y|, in the compute dtype
    weighted_sizes: jax.Array  # [S] |y| with the label weights (the plain count without)

    @property
    def are_indices(self) -> bool:
        return bool(jnp.issubdtype(self.values.dtype, jnp.integer))

    def present(self) -> jax.Array:
        """[S, C] or [S, K] bool: the labels (or the filled slots)."""
        return self.values >= 0 if self.are_indices else self.values > 0

    def per_label(self, label_weights: jax.Array) -> jax.Array:
        """The label weights laid out like `values` (0 where there is no label)."""
        if self.are_indices:
            safe_ids = jnp.maximum(self.values, 0)
            return jnp.where(self.values >= 0, label_weights[safe_ids], 0.0)
        return self.values * label_weights

    def intersection(self, other: _Labels, scale: jax.Array | None = None) -> jax.Array:
        """[S, G] sum over the labels shared with every set of `other` of `scale`, laid out like
        `values` (default 1: the count |y_a ∩ y_b|). Exact for counts below 2^24."""
        dtype = self.sizes.dtype
        if not self.are_indices:
            rows = self.values if scale is None else scale
            return jnp.dot(rows, other.values.T, precision=_EXACT)
        anchor_ids, candidate_ids = self.values, other.values
        candidate_slots = candidate_ids.T  # [K', G]: each slot's ids contiguous
        if anchor_ids.shape[1] == 0 or candidate_slots.shape[0] == 0:
            return jnp.zeros((anchor_ids.shape[0], candidate_ids.shape[0]), dtype)
        if scale is None and candidate_slots.shape[0] <= _UNROLLED_SLOTS:
            return _shared_counts(anchor_ids, candidate_slots).astype(dtype)
        if scale is None:
            scale = self.present().astype(dtype)

        def slot_total(ids: jax.Array, weights: jax.Array) -> jax.Array:
            """One slot of every anchor's list against every candidate list: [S, G]."""
            if candidate_slots.shape[0] <= _UNROLLED_SLOTS:
                # Fused elementwise passes over [S, G]: a float reduction over the slot axes
                # would materialise [S, G, K'].
                matched = functools.reduce(
                    jnp.logical_or,
                    (ids[:, None] == other_ids[None, :] for other_ids in candidate_slots),
                )
            else:
                matched = jnp.any(ids[:, None, None] == candidate_ids[None, :, :], axis=2)
            return jnp.where(matched, weights[:, None], 0.0)

        def add_slot(total: jax.Array, slot: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
            return total + slot_total(*slot), None

        scale = scale.astype(dtype)
        # The first slot starts the sum, so that the carry varies over devices as the data do.
        first = slot_total(anchor_ids[:, 0], scale[:, 0])
        return jax.lax.scan(add_slot, first, (anchor_ids.T[1:], scale.T[1:]))[0]

    def slot_counts(self, other: _Labels, weights: jax.Array) -> jax.Array:
        """[S, K] sum of `weights` [G] over the sets of `other` that hold each slot's id.

        A sort of other's ids and a binary search per slot: O((G K' + S K) log(G K')), whatever
        C is. The sums are of integer counts, exact in float32 below 2^24.
        """
        ids = other.values.reshape(-1)
        slot_weights = jnp.where(other.values >= 0, weights[:, None], 0.0).reshape(-1)
        order = jnp.argsort(ids)
        sorted_ids = ids[order]
        cumulative = jnp.concatenate(
            [jnp.zeros((1,), weights.dtype), jnp.cumsum(slot_weights[order])]
        )
        first = jnp.searchsorted(sorted_ids, self.values, side="left")
        last = jnp.searchsorted(sorted_ids, self.values, side="right")
        return jnp.where(self.present(), cumulative[last] - cumulative[first], 0.0)


def _shared_counts(anchor_ids: jax.Array, candidate_slots: jax.Array) -> jax.Array:
    """[S, G] int32 |y_a ∩ y_b| of index lists [S, K] against candidate slots [K', G].

    No id is twice in a list, so the count is the number of equal slot pairs: integer sums of
    comparisons, up to `_UNROLLED_PAIRS` of them fused in one pass over [S, G] (a float
    accumulator or one pass per slot costs about 1.5x as much on a CPU).
    """
    candidate_slots = jnp.where(candidate_slots >= 0, candidate_slots, -2)  # empty != empty
    per_pass = max(1, _UNROLLED_PAIRS // candidate_slots.shape[0])
    width = -(-anchor_ids.shape[1] // per_pass) * per_pass
    anchor_ids = jnp.pad(anchor_ids, ((0, 0), (0, width - anchor_ids.shape[1])), constant_values=-1)
    passes = anchor_ids.reshape(anchor_ids.shape[0], -1, per_pass).transpose(1, 0, 2)

    def count(ids: jax.Array) -> jax.Array:
        return functools.reduce(
            jnp.add,
            (
                (ids[:, i, None] == other_ids[None, :]).astype(jnp.int32)
                for i in range(per_pass)
                for other_ids in candidate_slots
            ),
        )

    def add_pass(total: jax.Array, ids: jax.Array) -> tuple[jax.Array, None]:
        return total + count(ids), None

    # The first pass starts the sum, so that the carry varies over devices as the data do.
    counts = jax.lax.scan(add_pass, count(passes[0]), passes[1:])[0]
    # Materialised once: XLA would otherwise fuse the comparisons into each of their consumers.
    materialised: jax.Array = jax.lax.optimization_barrier(counts)  # type: ignore[no-untyped-call]
    return materialised


def _as_labels(labels: Any, dtype: Any, label_weights: jax.Array | None) -> _Labels:
    """Per-sample `_Labels` of multi-hot labels, class ids or `LabelIndices`."""
    if isinstance(labels, LabelIndices):
        ids = jnp.asarray(labels.indices)
        if ids.dtype not in (jnp.int8, jnp.int16):  # narrow ids compare faster: keep them
            ids = ids.astype(jnp.int32)
        ids = jnp.where(ids >= 0, ids, -1)
        # A repeated id counts once: only its first slot is kept.
        width = ids.shape[1]
        earlier = jnp.tril(jnp.ones((width, width), bool), k=-1)
        repeated = jnp.any((ids[:, :, None] == ids[:, None, :]) & earlier, axis=2)
        values = jnp.where(repeated, -1, ids)
    else:
        labels = jnp.asarray(labels)
        if labels.ndim == 1:
            values = jnp.where(labels >= 0, labels, -1).astype(jnp.int32)[:, None]
        else:
            values = labels.astype(dtype)
    plain = _Labels(values, jnp.zeros(values.shape[:1], dtype), jnp.zeros(values.shape[:1], dtype))
    sizes = jnp.sum(plain.present(), axis=1).astype(dtype)
    weighted_sizes = sizes
    if label_weights is not None:
        weighted_sizes = jnp.sum(plain.per_label(label_weights), axis=1)
    return _Labels(values, sizes, weighted_sizes)


class _Anchors(NamedTuple):
    """Anchor views (the local batch, or one row block of it) and their samples' labels.

    Views are sample-major: the first three fields have one row per view, the last three one
    row per sample (V views each).
    """

    z: jax.Array  # [S * V, D] L2-normalised, in the compute dtype
    valid: jax.Array  # [S * V] bool
    view_ids: jax.Array  # [S * V] int32: global view index n * V + v
    labels: _Labels  # [S, ...]
    # Per-label weights of the anchor's weighted intersections, like `labels.values`: the label
    # weights (sd family, jaccard) or 1 / |P_k(a)| (mulsupcon); None when only counts are used.
    label_scale: jax.Array | None
    rows: jax.Array | None  # [S] mulsupcon: the sample's label rows that have a positive


class _ContrastSet(NamedTuple):
    """The candidates every anchor is scored against: the batch's views or the keys.

    Candidates come in groups that share one label set: the V views of a sample, or single
    keys (`_Options.group_size`). Built locally, then gathered over `axis_name` or passed around
    the ring, so that its ids are global: `sample_ids` names the global anchor sample a candidate
    is a view of (-1: none), and `view_ids` is the candidate's global view index when the
    candidates are the anchors themselves (-1 for keys, which are never the anchor itself).
    """

    z: jax.Array  # [M, D] L2-normalised
    valid: jax.Array  # [M] bool
    sample_ids: jax.Array  # [M] int32
    view_ids: jax.Array  # [M] int32
    labels: _Labels  # [M / group_size, ...]


def _expand(pair_values: jax.Array, anchor_views: int, group_size: int) -> jax.Array:
    """[S, G] values of sample pairs -> [S * V, G * group_size] values of view pairs."""
    samples, groups = pair_values.shape
    expanded = jnp.broadcast_to(
        pair_values[:, None, :, None], (samples, anchor_views, groups, group_size)
    )
    return expanded.reshape(samples * anchor_views, groups * group_size)


def _label_pair_weights(
    anchors: _Anchors, candidates: _Labels, options: _Options
) -> tuple[jax.Array, jax.Array]:
    """Weights and positives from labels alone, per pair of anchor sample and candidate group.

    Returns (weights [S, G], positive [S, G] bool), before masks and the same-sample rule.
    """
    positives = options.positives
    anchor_labels = anchors.labels
    if positives == "mulsupcon":
        weights = anchor_labels.intersection(candidates, anchors.label_scale)
        return weights, weights > 0
    # Label weights are > 0, so the weighted intersection tells the positives too.
    shared = shared_w = anchor_labels.intersection(candidates, anchors.label_scale)
    positive = shared > 0
    dtype = shared.dtype
    if positives == "any":
        return positive.astype(dtype), positive
    if positives == "all":
        positive = (
            positive
            & (shared == anchor_labels.sizes[:, None])
            & (shared == candidates.sizes[None, :])
        )
        return positive.astype(dtype), positive
    anchor_size = anchor_labels.weighted_sizes[:, None]
    candidate_size = candidates.weighted_sizes[None, :]
    tiny = np.finfo(dtype).tiny  # the sizes are 0 only where there is no positive
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
        weights = shared_w / jnp.maximum(union, tiny)
        positive = positive & (weights >= options.jaccard_threshold)
    return jnp.where(positive, weights, 0.0), positive


def _block_weights(
    anchors: _Anchors, contrast: _ContrastSet, options: _Options
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weights [B, M], contrast mask [B, M] and positive counts [B] of anchor views.

    The ids recognise the anchor itself (b = a, excluded) and the other views of the anchor's
    sample (same(a, b): positive, weight 1). Label arithmetic is done once per pair of samples.
    """
    not_self = anchors.view_ids[:, None] != contrast.view_ids[None, :]
    in_contrast = not_self & contrast.valid[None, :] & anchors.valid[:, None]
    # The barrier keeps XLA from fusing the label arithmetic into every view pair's consumers,
    # which would redo it V * V' times.
    sample_weights, sample_positive = jax.lax.optimization_barrier(  # type: ignore[no-untyped-call]
        _label_pair_weights(anchors, contrast.labels, options)
    )
    group_size = _group_size(options)
    positive = _expand(sample_positive, options.num_views, group_size) & in_contrast
    weights = jnp.where(positive, _expand(sample_weights, options.num_views, group_size), 0.0)
    count = positive.sum(axis=1)
    if options.positives != "mulsupcon" and (options.has_keys or options.num_views > 1):
        anchor_samples = anchors.view_ids // options.num_views
        same_sample = in_contrast & (anchor_samples[:, None] == contrast.sample_ids[None, :])
        count = count + jnp.sum(same_sample & ~positive, axis=1)
        weights = jnp.where(same_sample, 1.0, weights)
    return weights, in_contrast, count.astype(weights.dtype)


def _group_size(options: _Options) -> int:
    return 1 if options.has_keys else options.num_views


def _group_weights(contrast: _ContrastSet, options: _Options) -> jax.Array:
    """[G] the number of valid candidates in each group of the contrast set."""
    valid = contrast.valid.reshape(-1, _group_size(options))
    return valid.sum(axis=1).astype(contrast.z.dtype)


def _with_label_scale(
    anchors: _Anchors,
    candidate_counts: jax.Array | None,
    label_weights: jax.Array | None,
    options: _Options,
) -> _Anchors:
    """Adds the anchors' per-label weights: label weights, or mulsupcon's 1 / |P_k(a)|.

    `candidate_counts` (mulsupcon only) counts the valid candidates that carry each label: [C]
    for multi-hot labels, [S, K] for each slot of each anchor's index list.
    """
    labels = anchors.labels
    if options.positives == "mulsupcon":
        assert candidate_counts is not None
        counts = candidate_counts if labels.are_indices else candidate_counts[None, :]
        present = labels.present()
        sample_valid = anchors.valid.reshape(-1, options.num_views)[:, 0]
        if not options.has_keys:  # the anchor itself is not its own positive
            counts = counts - present * sample_valid[:, None]
        has_positive = present & (counts > 0)
        scale = jnp.where(has_positive, 1.0 / jnp.maximum(counts, 1.0), 0.0)
        rows = jnp.sum(has_positive, axis=1).astype(scale.dtype) * sample_valid
        return anchors._replace(label_scale=scale.astype(anchors.z.dtype), rows=rows)
    if label_weights is None or options.positives in ("all", "any"):
        return anchors
    return anchors._replace(label_scale=labels.per_label(label_weights))


def _candidate_counts(anchors: _Anchors, contrast: _ContrastSet, options: _Options) -> jax.Array:
    """mulsupcon: valid candidates of `contrast` carrying each label (see `_with_label_scale`)."""
    group_weights = _group_weights(contrast, options)
    if anchors.labels.are_indices:
        return anchors.labels.slot_counts(contrast.labels, group_weights)
    return jnp.dot(group_weights, contrast.labels.values, precision=_EXACT)


def label_relations(
    labels_a: ArrayLike | LabelIndices, labels_b: ArrayLike | LabelIndices | None = None
) -> jax.Array:
    """The `Relation` of every candidate's label set to every anchor's label set.

    Args:
      labels_a: [Na, C] multi-hot anchor labels, or `LabelIndices`.
      labels_b: [Nb, C] multi-hot candidate labels (or `LabelIndices`, as `labels_a`);
        defaults to `labels_a`.

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
    if isinstance(labels_a, LabelIndices) != isinstance(labels_b, LabelIndices):
        raise _dtype_error(
            "labels_b",
            type(labels_b).__name__,
            "the form of `labels_a`: both LabelIndices or neither",
        )
    shapes = [
        np.shape(value.indices if isinstance(value, LabelIndices) else value)
        for value in (labels_a, labels_b)
    ]
    for name, shape in zip(("labels_a", "labels_b"), shapes, strict=True):
        if len(shape) != 2:
            raise _shape_error(name, f"shape {shape}", "[N, C] multi-hot or LabelIndices")
    if not isinstance(labels_a, LabelIndices) and shapes[0][1] != shapes[1][1]:
        raise _shape_error("labels_b", f"shape {shapes[1]}", f"C = {shapes[0][1]} classes")
    anchors = _as_labels(labels_a, jnp.float32, None)
    candidates = _as_labels(labels_b, jnp.float32, None)
    shared = anchors.intersection(candidates)
    anchor_size = anchors.sizes[:, None]
    candidate_size = candidates.sizes[None, :]
    anchor_inside = shared == anchor_size
    candidate_inside = shared == candidate_size
    return jnp.select(
        [shared == 0, anchor_inside & candidate_inside, candidate_inside, anchor_inside],
        [Relation.DISJOINT, Relation.IDENTICAL, Relation.SUBSET, Relation.SUPERSET],
        Relation.OVERLAP,
    ).astype(jnp.int32)


def labels_from_indices(label_indices: ArrayLike, num_classes: int) -> jax.Array:
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
