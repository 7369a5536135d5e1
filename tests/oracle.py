"""A float64 loop oracle for the loss family, written plainly from docs/SPEC.md.

Every anchor, every candidate, sets as Python sets. Slow and obviously correct; shares no code
with sdjax. The official estimators of SupCon and MulSupCon in the query/key form are written
out separately, from their own definitions.
"""

import numpy as np


def label_set(row):
    return {k for k, v in enumerate(row) if v}


def size(labels, weights):
    return sum(weights[k] for k in labels)


def unit(x):
    x = np.asarray(x, np.float64)
    return x / max(np.sqrt(np.sum(x * x)), 1e-12)


def pair_weight(anchor, candidate, positives, weights, threshold):
    """(is_positive, w) for two different samples' label sets, per docs/SPEC.md's tables."""
    shared = anchor & candidate
    if positives == "all":
        return (anchor == candidate and len(anchor) > 0), 1.0
    if positives == "any":
        return len(shared) > 0, 1.0
    if positives == "jaccard":
        union = anchor | candidate
        jaccard = size(shared, weights) / size(union, weights) if union else 0.0
        return (jaccard >= threshold and jaccard > 0), jaccard
    if positives == "sd_swapped":  # K_s over the candidate's labels, K_d over the anchor's extra
        similarity = size(shared, weights) / size(candidate, weights) if candidate else 0.0
        dissimilarity = 1.0 / (1.0 + size(anchor - candidate, weights))
        return len(shared) > 0, similarity * dissimilarity
    similarity = size(shared, weights) / size(anchor, weights) if anchor else 0.0
    dissimilarity = 1.0 / (1.0 + size(candidate - anchor, weights))
    weight = {
        "sd": similarity * dissimilarity,
        "sd_similarity_only": similarity,
        "sd_dissimilarity_only": dissimilarity,
    }[positives]
    return len(shared) > 0, weight


class View:
    """An anchor or a candidate: its embedding, label set, sample and identity."""

    def __init__(self, z, labels, sample, name):
        self.z, self.labels, self.sample, self.name = z, labels, sample, name


def family_loss(anchors, candidates, *, positives, temperature, weights, jaccard_threshold):
    """SPEC.md's loss of `anchors` (valid views) against `candidates` (valid views or keys).

    Returns (loss, {anchor name: per-anchor loss}, {anchor name: anchor weight}).
    """
    per_anchor, anchor_weights = {}, {}
    total, count = 0.0, 0.0
    for a in anchors:
        contrast = [b for b in candidates if b.name != a.name]
        if not contrast:
            continue
        logit = {b.name: float(np.dot(a.z, b.z)) / temperature for b in contrast}
        log_normaliser = np.logaddexp.reduce(list(logit.values()))
        log_prob = {name: value - log_normaliser for name, value in logit.items()}

        if positives == "mulsupcon":
            rows = []
            for k in sorted(a.labels):
                members = [b for b in contrast if k in b.labels]
                if members:
                    rows.append(-sum(log_prob[b.name] for b in members) / len(members))
            if rows:
                per_anchor[a.name], anchor_weights[a.name] = np.mean(rows), len(rows)
                total += sum(rows)
                count += len(rows)
            continue

        terms = []
        for b in contrast:
            if b.sample is not None and b.sample == a.sample:  # a view of the anchor's sample
                terms.append(1.0 * log_prob[b.name])
                continue
            is_positive, w = pair_weight(a.labels, b.labels, positives, weights, jaccard_threshold)
            if is_positive:
                terms.append(w * log_prob[b.name])
        if terms:
            per_anchor[a.name], anchor_weights[a.name] = -sum(terms) / len(terms), 1.0
            total += per_anchor[a.name]
            count += 1
    return (total / count if count else 0.0), per_anchor, anchor_weights


def anchor_views(features, labels, sample_mask):
    """The valid views of [N, V, D] features as `View`s named (n, v)."""
    features = np.asarray(features, np.float64)
    num_samples, num_views, _ = features.shape
    valid = np.ones(num_samples, bool) if sample_mask is None else np.asarray(sample_mask, bool)
    sets = [label_set(row) for row in np.asarray(labels)]
    return [
        View(unit(features[n, v]), sets[n], n, (n, v))
        for n in range(num_samples)
        for v in range(num_views)
        if valid[n]
    ]


def per_anchor_arrays(shape, per_anchor, anchor_weights):
    losses, weights = np.zeros(shape), np.zeros(shape)
    for name, value in per_anchor.items():
        losses[name], weights[name] = value, anchor_weights[name]
    return losses, weights


def oracle(
    features,
    labels,
    *,
    positives="sd",
    temperature=0.07,
    sample_mask=None,
    label_weights=None,
    jaccard_threshold=0.5,
):
    """Returns (loss, per-anchor losses [N, V], per-anchor anchor weights [N, V]).

    features: [N, V, D]; labels: [N, C] multi-hot. Every view is an anchor and a candidate.
    """
    labels = np.asarray(labels)
    weights = np.ones(labels.shape[1]) if label_weights is None else np.asarray(label_weights)
    views = anchor_views(features, labels, sample_mask)
    loss, per_anchor, anchor_weights = family_loss(
        views,
        views,
        positives=positives,
        temperature=temperature,
        weights=weights,
        jaccard_threshold=jaccard_threshold,
    )
    return (loss, *per_anchor_arrays(np.shape(features)[:2], per_anchor, anchor_weights))


def query_key_oracle(
    features,
    labels,
    keys,
    key_labels,
    *,
    key_sample_ids=None,
    key_mask=None,
    positives="sd",
    temperature=0.07,
    sample_mask=None,
    label_weights=None,
    jaccard_threshold=0.5,
):
    """The query/key form: the anchors are the views of features [N, V, D]; the candidates are
    the valid keys [M, D] only; key m is a view of anchor sample key_sample_ids[m] (-1: none).

    Returns (loss, per-anchor losses [N, V], per-anchor anchor weights [N, V]).
    """
    labels, key_labels = np.asarray(labels), np.asarray(key_labels)
    weights = np.ones(labels.shape[1]) if label_weights is None else np.asarray(label_weights)
    num_keys = len(keys)
    ids = np.full(num_keys, -1) if key_sample_ids is None else np.asarray(key_sample_ids)
    key_valid = np.ones(num_keys, bool) if key_mask is None else np.asarray(key_mask, bool)
    candidates = [
        View(unit(keys[m]), label_set(key_labels[m]), ids[m] if ids[m] >= 0 else None, ("key", m))
        for m in range(num_keys)
        if key_valid[m]
    ]
    loss, per_anchor, anchor_weights = family_loss(
        anchor_views(features, labels, sample_mask),
        candidates,
        positives=positives,
        temperature=temperature,
        weights=weights,
        jaccard_threshold=jaccard_threshold,
    )
    return (loss, *per_anchor_arrays(np.shape(features)[:2], per_anchor, anchor_weights))


def log_softmax_rows(queries, keys, temperature):
    """log softmax over all keys of each query's logits, float64: [N, M]."""
    queries = np.array([unit(q) for q in queries])
    keys = np.array([unit(k) for k in keys])
    logits = queries @ keys.T / temperature
    out = np.zeros_like(logits)
    for i in range(len(queries)):
        out[i] = logits[i] - np.logaddexp.reduce(logits[i])
    return out


def mulsupcon_official(queries, query_labels, keys, key_labels, temperature):
    """MulSupCon's estimator with a key set (batch keys + queue): one row per (query i, label k
    of query i), whose positives are the keys carrying k; softmax over all keys; mean over rows.
    """
    log_prob = log_softmax_rows(queries, keys, temperature)
    rows = []
    for i, query_row in enumerate(np.asarray(query_labels)):
        for k in np.flatnonzero(query_row):
            members = [m for m in range(len(keys)) if key_labels[m][k]]
            if members:
                rows.append(-np.mean([log_prob[i, m] for m in members]))
    return float(np.mean(rows))


def supcon_official(queries, query_labels, keys, key_labels, temperature, mask_rule):
    """SupCon (Khosla et al., reference code with base_temperature = temperature) for queries
    against keys: softmax over all keys, the anchor's own key included; positives from
    mask_rule(query labels, key labels); mean over queries of the mean log-probability of their
    positives. Every query must have a positive."""
    log_prob = log_softmax_rows(queries, keys, temperature)
    per_query = []
    for i in range(len(queries)):
        positive = [m for m in range(len(keys)) if mask_rule(query_labels[i], key_labels[m])]
        assert positive, "SupCon's reference code divides by the number of positives"
        per_query.append(-np.mean([log_prob[i, m] for m in positive]))
    return float(np.mean(per_query))


def supcon_l_out(features, class_ids, temperature):
    """SupCon's L_out as the reference PyTorch SupConLoss computes it (contrast_mode='all',
    base_temperature = temperature), in numpy, for [N, V, D] features and [N] class ids."""
    features = np.asarray(features, np.float64)
    num_views = features.shape[1]
    z = features / np.linalg.norm(features, axis=-1, keepdims=True)
    contrast = np.concatenate([z[:, v] for v in range(num_views)])  # view-major, as torch.cat
    ids = np.tile(np.asarray(class_ids), num_views)
    logits = contrast @ contrast.T / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    self_mask = np.eye(len(ids), dtype=bool)
    positive = (ids[:, None] == ids[None, :]) & ~self_mask
    exp_logits = np.exp(logits) * ~self_mask
    log_prob = logits - np.log(exp_logits.sum(axis=1, keepdims=True))
    mean_log_prob_pos = (positive * log_prob).sum(axis=1) / positive.sum(axis=1)
    return float(-mean_log_prob_pos.mean())
