"""The losses and their per-anchor and pair-weight views."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sdjax.losses._checks import (
    _as_array_like,
    _check_int,
    _check_keys,
    _keys_as_array_like,
    _num_rows,
    _takes_keys,
)
from sdjax.losses._kernel import _fused_loss, _local_contrast, _mean_over_anchors, _scan_blocks
from sdjax.losses._labels import _block_weights, _candidate_counts, _with_label_scale
from sdjax.losses._operands import _prepare
from sdjax.losses._ring import _ring_loss
from sdjax.losses._types import (
    DEFAULT_EXCHANGE,
    DEFAULT_JACCARD_THRESHOLD,
    DEFAULT_POSITIVES,
    DEFAULT_TEMPERATURE,
    Keys,
    LabelIndices,
    PerAnchorLosses,
)


@_takes_keys
def multilabel_supcon_loss(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = DEFAULT_POSITIVES,
    temperature: ArrayLike = DEFAULT_TEMPERATURE,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = DEFAULT_JACCARD_THRESHOLD,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    exchange: str = DEFAULT_EXCHANGE,
    keys: Keys | None = None,
) -> jax.Array:
    """Multi-label supervised contrastive loss with a choice of positives and pair weights.

    Every view is an anchor; its contrast set is every other valid view in the (global) batch,
    or, in the query/key form, the valid `keys`. The loss is the mean over
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
      positives: one of `POSITIVES` ("sd" by default).
      temperature: a number > 0 (0.07 by default), or a 0-d float JAX array (it may be traced:
        a schedule, or a learned temperature, which gets its gradient dL/dtau). A traced value
        must be finite and > 0, which `jit` cannot check: `validate_inputs(...,
        temperature=tau)` does.
      sample_mask: [N] bool; False marks padding, which is neither anchor nor candidate.
      label_weights: [C] positive floats: |S| = sum of the weights of S's labels. Used by "sd",
        its ablations, "sd_swapped" and "jaccard"; the other choices use no cardinalities.
      jaccard_threshold: in (0, 1] (0.5 by default); used by "jaccard".
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
      keys: optional `Keys`, the contrast set of the query/key form (as in MoCo and MulSupCon's
        trainer): the anchors are the views of `features` and the contrast set is these M keys
        only, so the anchors themselves are not candidates. Their features are normalised here
        and differentiable (apply `jax.lax.stop_gradient` yourself to momentum-encoder keys).
        With `axis_name` the keys are sharded like the batch and exchanged, and their
        `sample_ids` count samples in the global batch.

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
      >>> from sdjax.losses import Keys, multilabel_supcon_loss
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(multilabel_supcon_loss(features, labels, positives="any")), 4)
      0.0279
      >>> keys = Keys(  # e.g. a momentum encoder's, or a queue
      ...     features=jnp.array([[0.9, 0.1], [0.0, 1.0]]),
      ...     labels=jnp.array([[1, 0, 0], [0, 0, 1]]),
      ...     sample_ids=jnp.array([1, -1]))  # key 0 is a view of sample 1
      >>> loss = multilabel_supcon_loss(features, labels, keys=keys)
      >>> round(float(loss), 4)
      0.0079
    """
    anchors, key_set, label_weights, temperature, options, _ = _prepare(
        features,
        labels,
        sample_mask,
        label_weights,
        keys,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=block_size,
        exchange=exchange,
    )
    loss = _ring_loss if options.exchange == "ring" else _fused_loss
    return loss(anchors, key_set, label_weights, temperature, options)


@_takes_keys
def similarity_dissimilarity_loss(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    temperature: ArrayLike = DEFAULT_TEMPERATURE,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    axis_name: Hashable | None = None,
    block_size: int | None = None,
    exchange: str = DEFAULT_EXCHANGE,
    keys: Keys | None = None,
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
      keys: optional `Keys`, the contrast set of the query/key form (see
        `multilabel_supcon_loss`).

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
        keys=keys,
    )


@_takes_keys
def per_anchor_losses(
    features: ArrayLike,
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = DEFAULT_POSITIVES,
    temperature: ArrayLike = DEFAULT_TEMPERATURE,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = DEFAULT_JACCARD_THRESHOLD,
    axis_name: Hashable | None = None,
    keys: Keys | None = None,
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
    anchors, key_set, label_weights, temperature, options, shape = _prepare(
        features,
        labels,
        sample_mask,
        label_weights,
        keys,
        positives=positives,
        temperature=temperature,
        jaccard_threshold=jaccard_threshold,
        axis_name=axis_name,
        block_size=None,
    )
    options = options._replace(block_size=anchors.z.shape[0])
    losses, anchor_weights = _scan_blocks(
        anchors, key_set, label_weights, temperature, options, False
    )
    return PerAnchorLosses(
        losses=losses.reshape(shape),
        has_positive=(anchor_weights > 0).reshape(shape),
        anchor_weights=anchor_weights.reshape(shape),
    )


def reduce_per_anchor(per_anchor: PerAnchorLosses, axis_name: Hashable | None = None) -> jax.Array:
    """The loss from `per_anchor_losses`: the anchor-weighted mean (0 if no anchor has one)."""
    return _mean_over_anchors(per_anchor.losses, per_anchor.anchor_weights, axis_name)[0]


@_takes_keys
def pair_weights(
    labels: ArrayLike | LabelIndices,
    *,
    positives: str = DEFAULT_POSITIVES,
    num_views: int = 1,
    sample_mask: ArrayLike | None = None,
    label_weights: ArrayLike | None = None,
    jaccard_threshold: float = DEFAULT_JACCARD_THRESHOLD,
    keys: Keys | None = None,
) -> jax.Array:
    """The weight w_ab each candidate b gets in anchor view a's positive sum.

    Views are sample-major (view m = n * V + v). Non-positives, the diagonal and padding get 0;
    other views of the anchor's sample get 1. For "mulsupcon" it is the effective weight
    `sum_k [k in y_a, k in y_b] / |P_k(a)|`, which already includes the per-row normalisation.
    With `keys`, the candidates are the M keys of the query/key form.

    Args:
      labels: [N, C] multi-hot, [N] class ids or `LabelIndices`.
      positives: one of `POSITIVES`.
      num_views: V, the views per sample.
      sample_mask: [N] bool.
      label_weights: [C] positive floats.
      jaccard_threshold: in (0, 1].
      keys: optional `Keys` of the query/key form; only their labels, mask and sample ids are
        used, so their features may be None.

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
    labels = _as_array_like(labels, "labels")
    keys = _keys_as_array_like(keys)
    _check_keys(keys, labels, None)
    dummy_features = jnp.zeros((_num_rows(labels), num_views, 1), jnp.float32)
    if keys is not None:  # the labels alone decide the weights
        keys = dataclasses.replace(
            keys, features=jnp.zeros((_num_rows(keys.labels), 1), jnp.float32)
        )
    anchors, key_set, label_weights, _, options, _ = _prepare(
        dummy_features,
        labels,
        sample_mask,
        label_weights,
        keys,
        positives=positives,
        temperature=1.0,
        jaccard_threshold=jaccard_threshold,
        axis_name=None,
        block_size=None,
    )
    contrast = _local_contrast(anchors, key_set, options)
    counts = None
    if options.positives == "mulsupcon":
        counts = _candidate_counts(anchors, contrast, options)
    anchors = _with_label_scale(anchors, counts, label_weights, options)
    return _block_weights(anchors, contrast, options)[0]
