"""The Similarity-Dissimilarity (S-D) loss family for multi-label supervised contrastive learning.

Pure, jittable functions of jax and numpy only. The math is `docs/SPEC.md`, which also lists the
points where it decides what the paper leaves open.

Every loss of the family is one weighted-contrastive kernel (`_kernel._row_terms`): logits
against the contrast set, a log-softmax over it, and a weighted sum over positives. Only the pair
weights change with `positives`, and they are computed once per pair of samples (not of views),
from multi-hot labels by an exact matmul or from `LabelIndices` by comparing ids, at a cost
independent of the number of classes (`_labels`). The contrast set is the batch's views, or the
`Keys` of the query/key form. The kernel runs over row blocks of anchors against the contrast
set: gathered over `axis_name` when given (`exchange="all_gather"`), or passed around the devices
one shard at a time with an online log-sum-exp (`exchange="ring"`, `_ring`), so memory stays
O(block * M + M * D) for M candidates, and O(block * M / P + M * D / P) per device on a ring of P.
Inputs are checked at trace time (`_checks`); `make_sharded_loss` (`_sharded`) wraps the loss in
`shard_map`.
"""

from sdjax.losses._api import (
    multilabel_supcon_loss,
    pair_weights,
    per_anchor_losses,
    reduce_per_anchor,
    similarity_dissimilarity_loss,
)
from sdjax.losses._checks import validate_inputs
from sdjax.losses._labels import label_relations, labels_from_indices
from sdjax.losses._sharded import make_sharded_loss
from sdjax.losses._types import EXCHANGES, POSITIVES, Keys, LabelIndices, PerAnchorLosses, Relation

__all__ = [
    "EXCHANGES",
    "POSITIVES",
    "Keys",
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
