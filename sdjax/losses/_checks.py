"""Input checks: shapes, ranks and dtype kinds at trace time; values in `validate_inputs`."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any, ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdjax.losses._types import POSITIVES, Keys, LabelIndices, _dtype_error, _shape_error

_ARGUMENTS = ("features", "labels", "sample_mask", "label_weights")

_P = ParamSpec("_P")
_R = TypeVar("_R")

# The keyword arguments that the keys replaced (sdjax 0.x before `Keys`).
_REMOVED_KEY_ARGUMENTS = (
    "contrast_features",
    "contrast_labels",
    "contrast_mask",
    "contrast_sample_ids",
)


def _reject_removed_arguments(names: Iterable[str]) -> None:
    for name in names:
        if name in _REMOVED_KEY_ARGUMENTS:
            raise TypeError(
                f"`{name}`: removed, the keys are one argument: "
                "keys=Keys(features, labels, mask=None, sample_ids=None)."
            )


def _takes_keys(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn`, with a one-line TypeError for the removed `contrast_*` keyword arguments (rather
    than Python's, which does not say what replaced them)."""

    @functools.wraps(fn)
    def checked(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _reject_removed_arguments(kwargs)
        return fn(*args, **kwargs)

    return checked


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


@_takes_keys
def validate_inputs(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    keys: Keys | None = None,
    temperature: ArrayLike | None = None,
) -> None:
    """Checks the values that `jit` cannot check. Call it eagerly, outside `jit`.

    The losses check shapes and dtypes while tracing; this checks values: multi-hot labels in
    {0, 1}, class ids >= -1, finite features and label weights > 0, and the same for the keys,
    whose `sample_ids` must lie in [-1, N); and a temperature (the value a traced one
    will have: a schedule's or a learned one's) finite and > 0. (Masks must be bool: the losses
    reject other dtypes, so 0/1 needs no value check.)

    Args:
      features: [N, D] or [N, V, D] floats.
      labels: [N, C] multi-hot or [N] integer class ids (-1 = no label).
      sample_mask: optional [N] bool.
      label_weights: optional [C] positive floats.
      keys: optional `Keys`, the contrast set of the query/key form, for one device's whole
        batch.
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
    keys = _keys_as_array_like(keys)
    num_samples, _, feature_dim = _check_arrays(features, labels, sample_mask, label_weights)
    _check_keys(keys, labels, feature_dim)
    _check_values("features", "labels", features, labels, label_weights)
    if keys is None:
        return
    _check_values("keys.features", "keys.labels", keys.features, keys.labels, label_weights)
    if keys.sample_ids is not None:
        _check_ids(
            "keys.sample_ids",
            keys.sample_ids,
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


def _check_keys(keys: Any, labels: Any, feature_dim: int | None) -> None:
    """Checks the keys of the query/key form against the anchors' labels and feature size
    (None: `pair_weights`, whose keys need no features)."""
    if keys is None:
        return
    _check_keys_type(keys)
    if keys.labels is None:
        raise ValueError("`keys.labels`: got None, expected the keys' labels.")
    if feature_dim is None:
        num_keys = _num_rows(keys.labels)
    else:
        if keys.features is None:
            raise ValueError("`keys.features`: got None, expected [M, D] floats.")
        shape = _check_features("keys.features", keys.features, (2,), "[M, D]")
        num_keys = shape[0]
        if shape[1] != feature_dim:
            raise _shape_error(
                "keys.features",
                f"shape {shape}",
                f"[M, D] with D = {feature_dim} (from `features`)",
            )
    key_labels_shape = _check_labels("keys.labels", keys.labels, num_keys, ("M", "keys.features"))
    if isinstance(labels, LabelIndices) != isinstance(keys.labels, LabelIndices):
        raise _dtype_error(
            "keys.labels",
            type(keys.labels).__name__,
            f"the form of `labels` ({type(labels).__name__}): both LabelIndices or neither",
        )
    labels_shape = key_labels_shape if isinstance(labels, LabelIndices) else np.shape(labels)
    if len(key_labels_shape) != len(labels_shape) or key_labels_shape[1:] != labels_shape[1:]:
        expected = "[M] class ids" if len(labels_shape) == 1 else f"[M, {labels_shape[1]}]"
        raise _shape_error(
            "keys.labels", f"shape {key_labels_shape}", f"{expected}, the form of `labels`"
        )
    _check_mask("keys.mask", keys.mask, num_keys, "keys.features")
    if keys.sample_ids is not None:
        if np.shape(keys.sample_ids) != (num_keys,):
            raise _shape_error(
                "keys.sample_ids",
                f"shape {np.shape(keys.sample_ids)}",
                f"[{num_keys}] (from `keys.features`)",
            )
        if not jnp.issubdtype(jnp.result_type(keys.sample_ids), jnp.integer):
            raise _dtype_error(
                "keys.sample_ids",
                f"dtype {jnp.result_type(keys.sample_ids)}",
                "integer sample indices (-1 = a view of no anchor sample)",
            )


def _check_keys_type(keys: Any) -> None:
    if not isinstance(keys, Keys):
        raise _dtype_error(
            "keys", type(keys).__name__, "Keys(features, labels, mask=None, sample_ids=None)"
        )


def _keys_as_array_like(keys: Any) -> Any:
    """`Keys` whose (nested) list fields are numpy arrays; anything else as it is."""
    if not isinstance(keys, Keys):
        return keys
    fields = {
        field.name: _as_array_like(getattr(keys, field.name), f"keys.{field.name}")
        for field in dataclasses.fields(keys)
    }
    return Keys(**fields)
