"""The public types and value lists of the loss family, the defaults its functions share, and
the one form of its errors."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

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

# The defaults of the keyword arguments that the public functions share: the one place they are.
DEFAULT_POSITIVES = "sd"
DEFAULT_TEMPERATURE = 0.07
DEFAULT_JACCARD_THRESHOLD = 0.5
DEFAULT_EXCHANGE = "all_gather"


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Keys:
    """The contrast set of the query/key form: M keys, each with its labels.

    With `keys`, the anchors are the views of `features` and the contrast set is these keys
    only (the anchors themselves are not candidates), as in MoCo and MulSupCon's trainer. A
    pytree: it passes through `jit`, `shard_map` and `make_sharded_loss` like an array, and
    `make_sharded_loss` shards every field along the batch axis.

    Attributes:
      features: [M, D] floats, normalised by the loss and differentiable (apply
        `jax.lax.stop_gradient` yourself to a momentum encoder's keys or a queue).
        `pair_weights` uses no features: None there.
      labels: the keys' labels in the form of the anchors' `labels`: [M, C] multi-hot, [M]
        class ids or `LabelIndices`.
      mask: optional [M] bool; False marks padding keys, which are never candidates.
      sample_ids: optional [M] integer: the index of the anchor sample each key is a view of,
        -1 for none (queue entries; the default for every key). A key of the anchor's own
        sample is a positive of weight 1 ("mulsupcon": through its labels, as in-batch). With
        `axis_name` the ids count samples in the global batch (device d's local sample n is
        d * N_local + n).

    Examples:
      >>> import jax.numpy as jnp
      >>> from sdjax.losses import Keys
      >>> keys = Keys(jnp.array([[0.9, 0.1], [0.0, 1.0]]), jnp.array([[1, 0], [0, 1]]),
      ...             sample_ids=jnp.array([0, -1]))  # key 0 is a view of sample 0
      >>> keys.features.shape, keys.mask is None
      ((2, 2), True)
    """

    features: ArrayLike | None
    labels: ArrayLike | LabelIndices
    mask: ArrayLike | None = None
    sample_ids: ArrayLike | None = None


class _Options(NamedTuple):
    """The static (hashable) settings of one loss call."""

    positives: str
    jaccard_threshold: float
    num_views: int
    axis_name: Hashable | None
    block_size: int
    has_keys: bool  # the contrast set is `Keys`, not the anchors' views
    exchange: str = DEFAULT_EXCHANGE  # "ring" only with an axis_name


def _shape_error(name: str, got: Any, expected: str) -> ValueError:
    return ValueError(f"`{name}`: got {got}, expected {expected}.")


def _dtype_error(name: str, got: Any, expected: str) -> TypeError:
    return TypeError(f"`{name}`: got {got}, expected {expected}.")
