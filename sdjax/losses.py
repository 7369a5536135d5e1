"""The Similarity-Dissimilarity (S-D) loss family for multi-label supervised contrastive learning.

Pure, jittable functions of jax and numpy only. The math is `docs/SPEC.md`, which also lists the
points where it decides what the paper leaves open.

Every loss of the family is one weighted-contrastive kernel (`_row_terms`): logits against the
contrast set, a log-softmax over it, and a weighted sum over positives. Only the pair weights change
with `positives`, and they are computed once per pair of samples (not of views), from multi-hot
labels by an exact matmul or from `LabelIndices` by comparing ids, at a cost independent of the
number of classes. The contrast set is the batch's views, or the keys of the query/key form
(`contrast_features`). The kernel runs over row blocks of anchors against the contrast set:
gathered over `axis_name` when given (`exchange="all_gather"`), or passed around the devices one
shard at a time with an online log-sum-exp (`exchange="ring"`), so memory stays
O(block * M + M * D) for M candidates, and O(block * M / P + M * D / P) per device on a ring of P.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "EXCHANGES",
    "POSITIVES",
    "LabelIndices",
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

# How the contrast set crosses devices with `axis_name` (docs/SPEC.md, "Cross-device batches").
EXCHANGES = ("all_gather", "ring")

# Feature norms are clamped below by this, as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Features with an entry above this are divided by their largest entry before squaring: D * 1e30
# stays finite in float32 for any D < 1e8.
_RESCALE_ABOVE = 1e15
# Automatic row blocks hold this many logits: [block, N] float32 near 16 MiB on a CPU (cache
# sized), 256 MiB on a GPU/TPU, where small blocks leave the chip idle (measured on an H100:
# experiments/README.md). Working memory is a few such matrices, whatever N is.
_AUTO_BLOCK_ELEMENTS = {"cpu": 1 << 22, "accelerator": 1 << 26}
# Index lists compare each anchor slot with up to this many candidate slots in one fused pass.
_UNROLLED_SLOTS = 64
# Unweighted index-list counts fuse up to this many slot comparisons in one pass.
_UNROLLED_PAIRS = 256
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LabelIndices:
    """Label sets as padded index lists: the compact label format for large label spaces.

    `indices` is [N, K] integer class ids, one row per sample; -1 marks an empty slot and a
    repeated id counts once. The losses then cost O(K^2) per pair of samples whatever the
    number of classes C, where multi-hot [N, C] labels cost O(C). A pytree: it passes through
    `jit`, `shard_map` and `make_sharded_loss` like an array.

    Examples:
      >>> import numpy as np
      >>> from sdjax.losses import LabelIndices
      >>> LabelIndices.from_multi_hot(np.array([[1, 0, 1], [0, 1, 0]])).indices.tolist()
      [[0, 2], [1, -1]]
    """

    indices: jax.Array

    @classmethod
    def from_multi_hot(cls, labels: ArrayLike) -> LabelIndices:
        """Index lists of concrete [N, C] multi-hot labels (numpy, outside `jit`), K = the
        largest label count of a row (at least 1)."""
        present = np.asarray(labels) != 0
        if present.ndim != 2:
            raise _shape_error("labels", f"shape {present.shape}", "[N, C] multi-hot")
        width = max(1, int(present.sum(axis=1).max(initial=0)))
        order = np.argsort(~present, axis=1, kind="stable")[:, :width]
        ids = np.where(np.take_along_axis(present, order, axis=1), order, -1)
        return cls(jnp.asarray(ids, jnp.int32))


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
    return jax.lax.optimization_barrier(counts)  # type: ignore[no-untyped-call]


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


class _Options(NamedTuple):
    """The static (hashable) settings of one loss call."""

    positives: str
    jaccard_threshold: float
    num_views: int
    axis_name: Hashable | None
    block_size: int
    has_keys: bool  # the contrast set is `contrast_features`, not the anchors' views
    exchange: str = "all_gather"  # "ring" only with an axis_name


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


def _num_rows(x: Any) -> int:
    """The leading size of an array or of `LabelIndices`."""
    return int(np.shape(x.indices if isinstance(x, LabelIndices) else x)[0])


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
        or not 0 < float(jaccard_threshold) <= 1  # type: ignore[arg-type]
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


def _check_features(
    name: str, features: Any, ranks: tuple[int, ...], expected: str
) -> tuple[int, ...]:
    """Checks a feature array's rank, dtype kind and sizes; returns its shape."""
    shape = np.shape(features)
    if len(shape) not in ranks:
        raise _shape_error(name, f"shape {shape}", expected)
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise _dtype_error(name, f"dtype {jnp.result_type(features)}", "a real float dtype")
    if min(shape) < 1:
        raise _shape_error(name, f"shape {shape}", f"{expected} with every size >= 1")
    return tuple(shape)


def _check_labels(
    name: str, labels: Any, num_rows: int, rows_from: tuple[str, str]
) -> tuple[int, ...]:
    if isinstance(labels, LabelIndices):
        shape, dtype = np.shape(labels.indices), jnp.result_type(labels.indices)
        if len(shape) != 2 or shape[0] != num_rows:
            raise _shape_error(
                name,
                f"LabelIndices of shape {shape}",
                f"[{rows_from[0]}, K] index lists with {rows_from[0]} = {num_rows} "
                f"(from `{rows_from[1]}`)",
            )
        if not jnp.issubdtype(dtype, jnp.integer):
            raise _dtype_error(name, f"LabelIndices of dtype {dtype}", "integer class ids")
        return shape
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
        multi_hot = len(labels_shape) == 2 and not isinstance(labels, LabelIndices)
        if multi_hot and weights_shape != (labels_shape[1],):
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
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    contrast_features: ArrayLike | None = None,
    contrast_labels: ArrayLike | LabelIndices | None = None,
    contrast_mask: ArrayLike | None = None,
    contrast_sample_ids: ArrayLike | None = None,
    temperature: ArrayLike | None = None,
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


def _check_values(
    features_name: str, labels_name: str, features: Any, labels: Any, label_weights: Any
) -> None:
    features = np.asarray(jnp.asarray(features, jnp.result_type(jnp.float32, features)))
    bad = np.argwhere(~np.isfinite(features))
    if bad.size:
        raise ValueError(
            f"`{features_name}`: got a non-finite value {features[tuple(bad[0])].item()} at "
            f"index {tuple(bad[0].tolist())}, expected finite values."
        )
    are_ids = isinstance(labels, LabelIndices) or np.ndim(labels) == 1
    labels = np.asarray(labels.indices if isinstance(labels, LabelIndices) else labels)
    if not are_ids:
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
        if are_ids and labels.size and labels.max() >= weights.shape[0]:
            raise ValueError(
                f"`{labels_name}`: got class id {labels.max()}, expected ids < "
                f"{weights.shape[0]} (the length of `label_weights`)."
            )


# --------------------------------------------------------------------------------------------
# Pair weights: the only thing that differs between the members of the family
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# The weighted-contrastive kernel
# --------------------------------------------------------------------------------------------


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


def _global_offset(num_local: int, axis_name: Hashable | None) -> jax.Array | int:
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * num_local


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


# --------------------------------------------------------------------------------------------
# The ring exchange: key shards travel around the devices, nobody holds the whole contrast set
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_contrast(
    contrast_features: Any,
    contrast_labels: Any,
    contrast_mask: Any,
    contrast_sample_ids: Any,
    labels: Any,
    feature_dim: int,
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
    key_labels_shape = _check_labels(
        "contrast_labels", contrast_labels, num_keys, ("M", "contrast_features")
    )
    if isinstance(labels, LabelIndices) != isinstance(contrast_labels, LabelIndices):
        raise _dtype_error(
            "contrast_labels",
            type(contrast_labels).__name__,
            f"the form of `labels` ({type(labels).__name__}): both LabelIndices or neither",
        )
    labels_shape = key_labels_shape if isinstance(labels, LabelIndices) else np.shape(labels)
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


def _prepare(
    features: Any,
    labels: Any,
    sample_mask: Any,
    label_weights: Any,
    *,
    positives: str,
    temperature: Any,
    jaccard_threshold: Any,
    axis_name: Hashable | None,
    block_size: Any,
    exchange: str = "all_gather",
    contrast_features: Any = None,
    contrast_labels: Any = None,
    contrast_mask: Any = None,
    contrast_sample_ids: Any = None,
) -> tuple[_Anchors, _ContrastSet | None, jax.Array | None, jax.Array, _Options, tuple[int, int]]:
    """Checks the inputs and builds the kernel's operands: sample-major anchor views
    (view m = n * V + v) with their samples' labels, the local keys (or None), the label
    weights, the temperature and the static options."""
    features, labels, sample_mask, label_weights = map(
        _as_array_like, (features, labels, sample_mask, label_weights), _ARGUMENTS
    )
    contrast_features, contrast_labels, contrast_mask, contrast_sample_ids = map(
        _as_array_like,
        (contrast_features, contrast_labels, contrast_mask, contrast_sample_ids),
        _CONTRAST_ARGUMENTS,
    )
    _check_options(positives, temperature, jaccard_threshold)
    if exchange not in EXCHANGES:
        raise ValueError(f"`exchange`: got {exchange!r}, expected one of {EXCHANGES}.")
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
    ring = axis_name is not None and exchange == "ring"

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
        valid=valid,
        view_ids=_global_offset(num_local_views, axis_name)
        + jnp.arange(num_local_views, dtype=jnp.int32),
        labels=_as_labels(labels, dtype, label_weights),
        label_scale=None,
        rows=None,
    )
    keys = None
    num_candidates = num_local_views
    if has_keys:
        num_candidates = num_keys = np.shape(contrast_features)[0]
        keys = _ContrastSet(
            z=_normalize(contrast_features, dtype),
            valid=(
                jnp.ones((num_keys,), bool) if contrast_mask is None else jnp.asarray(contrast_mask)
            ),
            sample_ids=(
                jnp.full((num_keys,), -1, jnp.int32)
                if contrast_sample_ids is None
                else jnp.asarray(contrast_sample_ids).astype(jnp.int32)
            ),
            view_ids=jnp.full((num_keys,), -1, jnp.int32),
            labels=_as_labels(contrast_labels, dtype, label_weights),
        )
    if not ring:  # a ring step scores one device's candidates, all_gather everyone's
        num_candidates *= num_shards
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
        exchange="ring" if ring else "all_gather",
    )
    temperature = jnp.asarray(temperature, dtype)
    if axis_name is not None:
        # A varying temperature makes each device's dL/dtau its own anchors' share, which the
        # transpose of this cast sums over devices (a replicated parameter's rule).
        temperature = _varying(temperature, axis_name)
    return anchors, keys, label_weights, temperature, options, (num_samples, num_views)


def _varying(x: jax.Array, axis_name: Hashable) -> jax.Array:
    try:
        varying: jax.Array = jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # already varying
        return x
    return varying


def multilabel_supcon_loss(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = "sd",
    temperature: ArrayLike = 0.07,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    exchange: str = "all_gather",
    contrast_features: ArrayLike | None = None,
    contrast_labels: ArrayLike | LabelIndices | None = None,
    contrast_mask: ArrayLike | None = None,
    contrast_sample_ids: ArrayLike | None = None,
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
      labels: [N, C] multi-hot (bool, int or float 0/1), [N] integer class ids, where -1 means
        no label, or `LabelIndices` ([N, K] class ids padded with -1). Class ids are
        single-label, and "sd", "all" and "any" then equal SupCon. Multi-hot labels cost O(C)
        per pair of samples, index lists O(K^2) whatever C: prefer them for thousands of
        classes. Arrays or (nested) Python lists.
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
      block_size: anchor views per row block (an int, numpy ints included), rounded up to whole
        samples. None (default) picks blocks of about 4M logits on a CPU and 64M on a GPU or
        TPU, so memory is O(block * M + M * D) at any batch size, M the number of candidates.
        Any value gives the same result.
      exchange: with `axis_name`, how the contrast set crosses devices: "all_gather" (the
        default: every device gathers the global contrast set once, fastest while it fits) or
        "ring" (each device's shard of candidates travels round the devices with
        `jax.lax.ppermute` while the local anchors accumulate an online log-sum-exp, and the
        gradient of each shard travels home the same way: no device holds more than two
        shards, so per-device memory is O(N / P) on P devices). Same result. Ignored without
        `axis_name`.
      contrast_features: optional [M, D] keys (the query/key form, as in MoCo and MulSupCon's
        trainer). When given, the anchors are the views of `features` and the contrast set is
        these M keys only: the anchors themselves are not candidates. Normalised here, and
        differentiable (apply `jax.lax.stop_gradient` yourself for momentum-encoder keys).
      contrast_labels: [M, C] multi-hot (or [M] class ids, or `LabelIndices`, in the form of
        `labels`): the keys' labels. Required with `contrast_features`.
      contrast_mask: optional [M] bool; False marks padding keys, which are never candidates.
      contrast_sample_ids: optional [M] integer: the index of the anchor sample each key is a
        view of, -1 for none (queue entries, the default for every key). A key of the anchor's
        own sample is a positive of weight 1 (mulsupcon: through its labels, as in-batch). With
        `axis_name` the keys are sharded like the batch and exchanged, and the ids count samples
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
    anchors, keys, label_weights, temperature, options, _ = _prepare(
        features,
        labels,
        sample_mask,
        label_weights,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=block_size,
        exchange=exchange,
        contrast_features=contrast_features,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )
    loss = _ring_loss if options.exchange == "ring" else _fused_loss
    return loss(anchors, keys, label_weights, temperature, options)


def similarity_dissimilarity_loss(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    temperature: ArrayLike = 0.07,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    exchange: str = "all_gather",
    contrast_features: ArrayLike | None = None,
    contrast_labels: ArrayLike | LabelIndices | None = None,
    contrast_mask: ArrayLike | None = None,
    contrast_sample_ids: ArrayLike | None = None,
) -> jax.Array:
    """The Similarity-Dissimilarity (S-D) loss: `multilabel_supcon_loss(positives="sd")`.

    A candidate b sharing a label with anchor a is a positive of weight
    `w_ab = K_s * K_d = (|y_a ∩ y_b| / |y_a|) * 1 / (1 + |y_b \\ y_a|)`.

    Args:
      features: [N, D] or [N, V, D] embeddings (normalised here).
      labels: [N, C] multi-hot, [N] integer class ids (-1 = no label) or `LabelIndices`.
      temperature: a number > 0 or a 0-d float array (may be traced).
      sample_mask: [N] bool; False marks padding.
      label_weights: [C] positive floats for weighted cardinalities.
      axis_name: the mapped axis to gather the contrast set over (see `multilabel_supcon_loss`).
      block_size: anchor views per row block; None picks one.
      exchange: "all_gather" or "ring" across devices (see `multilabel_supcon_loss`).
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
        exchange=exchange,
        contrast_features=contrast_features,
        contrast_labels=contrast_labels,
        contrast_mask=contrast_mask,
        contrast_sample_ids=contrast_sample_ids,
    )


def per_anchor_losses(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = "sd",
    temperature: ArrayLike = 0.07,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = 0.5,
    axis_name: Hashable | None = None,
    contrast_features: ArrayLike | None = None,
    contrast_labels: ArrayLike | LabelIndices | None = None,
    contrast_mask: ArrayLike | None = None,
    contrast_sample_ids: ArrayLike | None = None,
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
    anchors, keys, label_weights, temperature, options, shape = _prepare(
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
    losses, anchor_weights = _scan_blocks(anchors, keys, label_weights, temperature, options, False)
    return PerAnchorLosses(
        losses=losses.reshape(shape),
        has_positive=(anchor_weights > 0).reshape(shape),
        anchor_weights=anchor_weights.reshape(shape),
    )


def reduce_per_anchor(per_anchor: PerAnchorLosses, axis_name: Hashable | None = None) -> jax.Array:
    """The loss from `per_anchor_losses`: the anchor-weighted mean (0 if no anchor has one)."""
    return _mean_over_anchors(per_anchor.losses, per_anchor.anchor_weights, axis_name)[0]


def pair_weights(
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = "sd",
    num_views: int = 1,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = 0.5,
    contrast_labels: ArrayLike | LabelIndices | None = None,
    contrast_mask: ArrayLike | None = None,
    contrast_sample_ids: ArrayLike | None = None,
) -> jax.Array:
    """The weight w_ab each candidate b gets in anchor view a's positive sum.

    Views are sample-major (view m = n * V + v). Non-positives, the diagonal and padding get 0;
    other views of the anchor's sample get 1. For "mulsupcon" it is the effective weight
    `sum_k [k in y_a, k in y_b] / |P_k(a)|`, which already includes the per-row normalisation.
    With `contrast_labels`, the candidates are the M keys of the query/key form.

    Args:
      labels: [N, C] multi-hot, [N] class ids or `LabelIndices`.
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
    dummy_features = jnp.zeros((_num_rows(labels), num_views, 1), jnp.float32)
    dummy_keys = None
    if contrast_labels is not None:
        dummy_keys = jnp.zeros((_num_rows(contrast_labels), 1), jnp.float32)
    anchors, keys, label_weights, _, options, _ = _prepare(
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
    contrast = _local_contrast(anchors, keys, options)
    counts = None
    if options.positives == "mulsupcon":
        counts = _candidate_counts(anchors, contrast, options)
    anchors = _with_label_scale(anchors, counts, label_weights, options)
    return _block_weights(anchors, contrast, options)[0]


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


def make_sharded_loss(
    mesh: jax.sharding.Mesh, axis_name: Hashable = "data", **loss_kwargs: Any
) -> Callable[..., jax.Array]:
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
    batch = jax.sharding.PartitionSpec(axis_name)  # type: ignore[no-untyped-call]
    replicated = jax.sharding.PartitionSpec()  # type: ignore[no-untyped-call]
    num_shards = mesh.shape[axis_name]

    def loss_fn(
        features: ArrayLike,
        labels: ArrayLike | LabelIndices,
        sample_mask: ArrayLike | None = None,
        *,
        temperature: float | ArrayLike | None = None,
        **keys: Any,
    ) -> jax.Array:
        unknown = set(keys) - set(_KEY_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}.")
        if sample_mask is None:
            sample_mask = jnp.ones((np.shape(features)[0],), bool)
        for name, value in (("features", features), *keys.items()):
            if value is not None and _num_rows(value) % num_shards:
                rows, mask = ("samples", "`sample_mask`")
                if name != "features":
                    rows, mask = ("keys", "`contrast_mask`")
                raise ValueError(
                    f"`{name}`: got {_num_rows(value)} {rows}, expected a multiple of the "
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
            operands, specs = (*operands, temperature), (*specs, replicated)

        def body(f: jax.Array, y: Any, m: jax.Array, *rest: Any) -> jax.Array:
            tau = rest[-1] if traced_temperature else temperature
            key_values = dict(zip(key_names, rest[: len(key_names)], strict=True))
            return multilabel_supcon_loss(
                f, y, sample_mask=m, temperature=tau, axis_name=axis_name, **key_values, **kwargs
            )

        per_shard = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=replicated)
        loss: jax.Array = per_shard(*operands)
        return loss

    return loss_fn


_KEY_ARGUMENTS = ("contrast_features", "contrast_labels", "contrast_mask", "contrast_sample_ids")
