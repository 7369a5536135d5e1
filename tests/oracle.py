"""A float64 loop oracle for the loss family, written plainly from docs/SPEC.md.

Every anchor, every candidate, sets as Python sets. Slow and obviously correct; shares no code
with sdjax.
"""

import numpy as np


def label_set(row):
    return {k for k, v in enumerate(row) if v}


def size(labels, weights):
    return sum(weights[k] for k in labels)


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
    similarity = size(shared, weights) / size(anchor, weights) if anchor else 0.0
    dissimilarity = 1.0 / (1.0 + size(candidate - anchor, weights))
    weight = {
        "sd": similarity * dissimilarity,
        "sd_similarity_only": similarity,
        "sd_dissimilarity_only": dissimilarity,
    }[positives]
    return len(shared) > 0, weight


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
    """Returns (loss, per-anchor losses [N, V], per-anchor reduction weights [N, V]).

    features: [N, V, D]; labels: [N, C] multi-hot.
    """
    features = np.asarray(features, np.float64)
    num_samples, num_views, _ = features.shape
    labels = np.asarray(labels)
    sets = [label_set(row) for row in labels]
    weights = np.ones(labels.shape[1]) if label_weights is None else np.asarray(label_weights)
    valid = np.ones(num_samples, bool) if sample_mask is None else np.asarray(sample_mask, bool)

    views = [(n, v) for n in range(num_samples) for v in range(num_views)]
    z = {}
    for n, v in views:
        x = features[n, v]
        z[n, v] = x / max(np.sqrt(np.sum(x * x)), 1e-12)

    def logit(a, b):
        return float(np.dot(z[a], z[b])) / temperature

    per_anchor = np.zeros((num_samples, num_views))
    reduction = np.zeros((num_samples, num_views))
    total, count = 0.0, 0.0
    for a in views:
        if not valid[a[0]]:
            continue
        contrast = [b for b in views if b != a and valid[b[0]]]
        if not contrast:
            continue
        log_normaliser = np.logaddexp.reduce([logit(a, c) for c in contrast])

        def log_prob(b, a=a, log_normaliser=log_normaliser):
            return logit(a, b) - log_normaliser

        if positives == "mulsupcon":
            rows = []
            for k in sorted(sets[a[0]]):
                members = [b for b in contrast if k in sets[b[0]]]
                if members:
                    rows.append(-sum(log_prob(b) for b in members) / len(members))
            if rows:
                per_anchor[a] = np.mean(rows)
                reduction[a] = len(rows)
                total += sum(rows)
                count += len(rows)
            continue

        terms = []
        for b in contrast:
            if b[0] == a[0]:  # another view of the anchor's own sample
                terms.append(1.0 * log_prob(b))
                continue
            is_positive, w = pair_weight(
                sets[a[0]], sets[b[0]], positives, weights, jaccard_threshold
            )
            if is_positive:
                terms.append(w * log_prob(b))
        if terms:
            per_anchor[a] = -sum(terms) / len(terms)
            reduction[a] = 1.0
            total += per_anchor[a]
            count += 1
    loss = total / count if count else 0.0
    return loss, per_anchor, reduction


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
