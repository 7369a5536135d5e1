"""What each kind of input needs: how host arrays become encoder inputs, and how views are made.

A `Modality` holds both functions, and every dataset points at one (`Dataset.modality`), so no
code branches on a modality's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.tokenizer import PAD_ID

TABULAR_NOISE_STD = 0.1  # features are standardised, so this is a tenth of a feature's spread
TABULAR_DROPOUT = 0.1
TOKEN_DROPOUT = 0.1


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]."""
    return images.astype(np.float32) / 255.0


def augment_views(rng: jax.Array, images: jax.Array, num_views: int = 2) -> jax.Array:
    """`num_views` random views of each image: [B, H, W, C] -> [B, V, H, W, C].

    A translation of up to 1/14 of the side (zero padding) and brightness/contrast jitter.
    Mild on purpose: every digit of a mosaic stays visible, so the label set stays true.
    """
    batch, height, width, _ = images.shape
    pad = max(1, height // 14)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one_view(key):
        shift_key, contrast_key, brightness_key = jax.random.split(key, 3)
        offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * pad + 1)
        crop = jax.vmap(
            lambda image, offset: jax.lax.dynamic_slice(
                image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
            )
        )(padded, offsets)
        contrast = jax.random.uniform(contrast_key, (batch, 1, 1, 1), minval=0.7, maxval=1.3)
        brightness = jax.random.uniform(brightness_key, (batch, 1, 1, 1), minval=-0.2, maxval=0.2)
        return jnp.clip(crop * contrast + brightness, 0.0, 1.0)

    views = jax.vmap(one_view)(jax.random.split(rng, num_views))  # [V, B, H, W, C]
    return jnp.swapaxes(views, 0, 1)


def tabular_views(rng: jax.Array, features: jax.Array, num_views: int = 2) -> jax.Array:
    """[B, F] -> [B, V, F]: Gaussian feature noise, then each feature zeroed (its mean) w.p. 0.1."""

    def one_view(key):
        noise_key, drop_key = jax.random.split(key)
        noisy = features + TABULAR_NOISE_STD * jax.random.normal(noise_key, features.shape)
        keep = jax.random.bernoulli(drop_key, 1 - TABULAR_DROPOUT, features.shape)
        return jnp.where(keep, noisy, 0.0)

    return jnp.swapaxes(jax.vmap(one_view)(jax.random.split(rng, num_views)), 0, 1)


def text_views(rng: jax.Array, tokens: jax.Array, num_views: int = 2) -> jax.Array:
    """[B, L] -> [B, V, L]: token dropout, each token replaced by padding w.p. 0.1.

    Padding is masked out by the text encoder, so a dropped token is deleted from the text. A
    text that would lose all its tokens keeps them.
    """

    def one_view(key):
        keep = jax.random.bernoulli(key, 1 - TOKEN_DROPOUT, tokens.shape)
        dropped = jnp.where(keep, tokens, PAD_ID)
        empty = jnp.all(dropped == PAD_ID, axis=1, keepdims=True)
        return jnp.where(empty, tokens, dropped)

    return jnp.swapaxes(jax.vmap(one_view)(jax.random.split(rng, num_views)), 0, 1)


def _unchanged(inputs: np.ndarray) -> np.ndarray:
    return inputs


@dataclasses.dataclass(frozen=True)
class Modality:
    """One kind of input.

    Attributes:
      name: "image", "tabular" or "text" (for tables and logs; no code branches on it).
      model_inputs: host arrays -> what the encoder takes, [B, ...] -> [B, ...].
      make_views: `(rng, inputs, num_views) -> [B, V, ...]`, augmented views of model inputs.
    """

    name: str
    model_inputs: Callable[[np.ndarray], np.ndarray]
    make_views: Callable[..., jax.Array]


IMAGE = Modality("image", model_inputs=to_float, make_views=augment_views)
TABULAR = Modality("tabular", model_inputs=_unchanged, make_views=tabular_views)
TEXT = Modality("text", model_inputs=_unchanged, make_views=text_views)
