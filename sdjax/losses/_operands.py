"""The kernel's operands from the public arguments: checked, normalised, laid out per view."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.losses._checks import (
    _ARGUMENTS,
    _as_array_like,
    _check_arrays,
    _check_axis_name,
    _check_int,
    _check_keys,
    _check_options,
    _keys_as_array_like,
)
from sdjax.losses._kernel import _varying
from sdjax.losses._labels import _Anchors, _as_labels, _ContrastSet
from sdjax.losses._types import DEFAULT_EXCHANGE, EXCHANGES, Keys, _Options

# Feature norms are clamped below by this, as torch.nn.functional.normalize does.
_NORM_EPS = 1e-12
# Features with an entry above this are divided by their largest entry before squaring: D * 1e30
# stays finite in float32 for any D < 1e8.
_RESCALE_ABOVE = 1e15
# Automatic row blocks hold this many logits: [block, N] float32 near 16 MiB on a CPU (cache
# sized), 256 MiB on a GPU/TPU, where small blocks leave the chip idle (measured on an H100:
# experiments/README.md). Working memory is a few such matrices, whatever N is.
_AUTO_BLOCK_ELEMENTS = {"cpu": 1 << 22, "accelerator": 1 << 26}


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


def _prepare(
    features: Any,
    labels: Any,
    sample_mask: Any,
    label_weights: Any,
    keys: Keys | None,
    *,
    positives: str,
    temperature: Any,
    jaccard_threshold: Any,
    axis_name: Hashable | None,
    block_size: Any,
    exchange: str = DEFAULT_EXCHANGE,
) -> tuple[_Anchors, _ContrastSet | None, jax.Array | None, jax.Array, _Options, tuple[int, int]]:
    """Checks the inputs and builds the kernel's operands: sample-major anchor views
    (view m = n * V + v) with their samples' labels, the local keys (or None), the label
    weights, the temperature and the static options."""
    features, labels, sample_mask, label_weights = map(
        _as_array_like, (features, labels, sample_mask, label_weights), _ARGUMENTS
    )
    keys = _keys_as_array_like(keys)
    _check_options(positives, temperature, jaccard_threshold)
    if exchange not in EXCHANGES:
        raise ValueError(f"`exchange`: got {exchange!r}, expected one of {EXCHANGES}.")
    num_samples, num_views, feature_dim = _check_arrays(
        features, labels, sample_mask, label_weights
    )
    _check_keys(keys, labels, feature_dim)
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    num_shards = _check_axis_name(axis_name)
    has_keys = keys is not None
    ring = axis_name is not None and exchange == "ring"

    # float32 is the floor (bf16/f16 compute in float32); float64 stays float64 under x64.
    dtypes = [jnp.result_type(features)]
    if keys is not None:
        dtypes.append(jnp.result_type(keys.features))
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
    key_set = None
    num_candidates = num_local_views
    if keys is not None:
        key_features: Any = keys.features  # not None: `_check_keys` said so
        num_candidates = num_keys = np.shape(key_features)[0]
        key_set = _ContrastSet(
            z=_normalize(key_features, dtype),
            valid=jnp.ones((num_keys,), bool) if keys.mask is None else jnp.asarray(keys.mask),
            sample_ids=(
                jnp.full((num_keys,), -1, jnp.int32)
                if keys.sample_ids is None
                else jnp.asarray(keys.sample_ids).astype(jnp.int32)
            ),
            view_ids=jnp.full((num_keys,), -1, jnp.int32),
            labels=_as_labels(keys.labels, dtype, label_weights),
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
    return anchors, key_set, label_weights, temperature, options, (num_samples, num_views)
