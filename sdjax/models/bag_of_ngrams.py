"""A fastText-style text encoder: the mean of token and hashed token-bigram embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax.tokenizer import PAD_ID

# Multiplicative hashing constants (odd, so multiplication is a bijection modulo 2^32).
_BIGRAM_MULTIPLIER = np.uint32(0x9E3779B1)  # 2^32 / golden ratio, rounded to odd
_MIX_MULTIPLIER = np.uint32(0x85EBCA6B)  # murmur3's finaliser constant


def bigram_buckets(tokens: jax.Array, num_buckets: int) -> jax.Array:
    """Hashed bucket ids of adjacent token pairs: int [B, L] -> int32 [B, L - 1].

    Entry i hashes the pair (tokens[:, i], tokens[:, i + 1]) with uint32 arithmetic (it wraps
    modulo 2^32 alike in numpy and XLA): h = a * 0x9E3779B1 + b, then h ^= h >> 16,
    h *= 0x85EBCA6B, h ^= h >> 13, and the bucket is h mod `num_buckets`.

    Args:
      tokens: int token ids [B, L], L >= 1.
      num_buckets: the number of hash buckets, >= 1.

    Returns:
      int32 [B, L - 1] bucket ids in [0, num_buckets).

    Example:
      >>> bigram_buckets(jnp.array([[3, 5, 3, 5]]), 1000).tolist()[0][0] == (
      ...     bigram_buckets(jnp.array([[3, 5]]), 1000).tolist()[0][0])
      True
    """
    first = tokens[:, :-1].astype(jnp.uint32)
    second = tokens[:, 1:].astype(jnp.uint32)
    h = first * _BIGRAM_MULTIPLIER + second
    h = h ^ (h >> 16)
    h = h * _MIX_MULTIPLIER
    h = h ^ (h >> 13)
    return (h % np.uint32(num_buckets)).astype(jnp.int32)


class BagOfNgramsEncoder(nnx.Module):
    """int token ids [B, L] (PAD_ID = padding) -> [B, width] or [B, hidden_dim].

    The features are the mean, over a text's non-pad tokens and its bigrams of two non-pad
    tokens, of their embeddings: token ids index a [vocab_size, width] table, bigrams are hashed
    (`bigram_buckets`) into a [num_buckets, width] table. Word order beyond bigrams is ignored,
    as in fastText, so long texts cost O(L), not O(L^2). `num_buckets = 0` keeps unigrams only.
    `token_weights = True` makes the unigram mean a weighted one, each token id weighing
    exp(a learned scalar, initially 0), so that the model can learn idf-like weights.
    `layer_norm = True` applies LayerNorm to the pooled features: a mean of many small
    embeddings is small, and a linear classifier on it learns slowly. `hidden_dim > 0` adds
    LayerNorm (whatever `layer_norm` says), Linear(width -> hidden_dim) and GELU on top.
    `dropout_rate > 0` drops pooled features (and hidden units) in training; the probe
    encodes through `sdjax.models.evaluation_view`, which turns dropout off.

    Lookups and the MLP compute in `dtype` (None: float32); the pooling sums in float32;
    parameters and features are float32.

    References:
      Joulin et al., "Bag of Tricks for Efficient Text Classification", EACL 2017.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 128,
        num_buckets: int = 0,
        hidden_dim: int = 0,
        token_weights: bool = False,
        dropout_rate: float = 0.0,
        layer_norm: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        for field, value, low in (
            ("vocab_size", vocab_size, 1),
            ("width", width, 1),
            ("num_buckets", num_buckets, 0),
            ("hidden_dim", hidden_dim, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"config.model.encoder.{field}: got {value!r}, expected an int >= {low}."
                )
        if not 0 <= dropout_rate < 1:
            raise ValueError(
                f"config.model.encoder.dropout_rate: got {dropout_rate!r}, expected [0, 1)."
            )
        for field, value in (("token_weights", token_weights), ("layer_norm", layer_norm)):
            if not isinstance(value, bool):
                raise ValueError(f"config.model.encoder.{field}: got {value!r}, expected a bool.")
        # One learned log-weight per token id (0: every token weighs 1), an idf-like weighting.
        self.token_log_weight = (
            nnx.Param(jnp.zeros((vocab_size,), jnp.float32)) if token_weights else None
        )
        self.token_embedding = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
        self.bigram_embedding = (
            nnx.Embed(num_buckets, width, dtype=dtype, rngs=rngs) if num_buckets else None
        )
        self.norm = (
            nnx.LayerNorm(width, dtype=dtype, rngs=rngs) if layer_norm or hidden_dim else None
        )
        self.hidden = nnx.Linear(width, hidden_dim, dtype=dtype, rngs=rngs) if hidden_dim else None
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.vocab_size, self.num_buckets = vocab_size, num_buckets
        self.features_dim = hidden_dim or width

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"`tokens`: got shape {tokens.shape}, expected [batch, length >= 1].")
        is_token = tokens != PAD_ID
        weights = is_token.astype(jnp.float32)
        if self.token_log_weight is not None:
            weights = weights * jnp.exp(self.token_log_weight[...][tokens])
        total = jnp.einsum("bl,blw->bw", weights, self.token_embedding(tokens).astype(jnp.float32))
        count = weights.sum(axis=1)
        if self.bigram_embedding is not None and tokens.shape[1] > 1:
            # A bigram counts only when both tokens are real: none spans padding or a dropped
            # token (views delete tokens by padding them).
            pair_weights = (is_token[:, :-1] & is_token[:, 1:]).astype(jnp.float32)
            pairs = self.bigram_embedding(bigram_buckets(tokens, self.num_buckets))
            total = total + jnp.einsum("bl,blw->bw", pair_weights, pairs.astype(jnp.float32))
            count = count + pair_weights.sum(axis=1)
        # max(count, 1): an all-padding row gives zeros rather than NaN.
        features = total / jnp.maximum(count, 1.0)[:, None]
        if self.norm is not None:
            features = self.norm(features)
        features = self.dropout(features)
        if self.hidden is not None:
            features = self.dropout(nnx.gelu(self.hidden(features)))
        return features.astype(jnp.float32)
