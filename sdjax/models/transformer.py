"""A Transformer text encoder: token + position embeddings, pre-norm blocks, mean pooling."""

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax.tokenizer import PAD_ID


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention and MLP, each with a residual connection."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=None):
        self.attention_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=width, decode=False, dtype=dtype, rngs=rngs
        )
        self.mlp_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(width, mlp_dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TextTransformerEncoder(nnx.Module):
    """int token ids [B, L] (PAD_ID = padding) -> [B, width], the mean over non-pad tokens.

    The layers compute in `dtype` (None: float32); parameters and features are float32.
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_dim: int = 256,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        for field, value in (
            ("vocab_size", vocab_size),
            ("max_length", max_length),
            ("width", width),
            ("depth", depth),
            ("num_heads", num_heads),
            ("mlp_dim", mlp_dim),
        ):
            if value < 1:
                raise ValueError(f"config.model.encoder.{field}: got {value}, expected >= 1.")
        if width % num_heads:
            raise ValueError(
                f"config.model.encoder.width: got {width}, expected a multiple of "
                f"num_heads={num_heads}."
            )
        self.token_embedding = nnx.Embed(vocab_size, width, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (max_length, width))
        )
        self.blocks = nnx.List(
            [
                TransformerBlock(width, num_heads, mlp_dim, rngs=rngs, dtype=dtype)
                for _ in range(depth)
            ]
        )
        self.final_norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        self.vocab_size, self.max_length, self.features_dim = vocab_size, max_length, width

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
            raise ValueError(
                f"`tokens`: got shape {tokens.shape}, expected [batch, length <= "
                f"{self.max_length}] token ids."
            )
        is_token = tokens != PAD_ID
        positions = self.position_embedding[: tokens.shape[1]]
        x = self.token_embedding(tokens)
        x = x + positions.astype(x.dtype)
        mask = nnx.make_attention_mask(is_token, is_token)
        for block in self.blocks:
            x = block(x, mask)
        # Pool in float32 (a no-op for float32 activations): features leave the encoder exact.
        x = self.final_norm(x).astype(jnp.float32)
        weights = is_token[..., None].astype(x.dtype)
        # max(count, 1): an all-padding row gives zeros rather than NaN.
        return (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
