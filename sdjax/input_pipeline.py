"""One input path for every dataset: tfds builders, held in memory, sampled by (seed, step).

The datasets here fit in host memory, so a split is loaded once as numpy arrays. The order of
batches is a pure function of (seed, step), which makes a resumed run see exactly the data an
uninterrupted run would, and each host takes its own slice of every global batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# Config name -> (tfds builder name, builder config); builders in sdjax.datasets register
# themselves when imported.
DATASETS = {
    "mnist_mosaic": ("mnist_mosaic", "default"),
    "mnist_mosaic_tiny": ("mnist_mosaic", "tiny"),
}


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or str(
        Path.home() / ".cache" / "sdjax" / "tensorflow_datasets"
    )


def load_split(name: str, split: str, *, data_dir: str = "") -> dict[str, np.ndarray]:
    """A whole split as numpy arrays: {"image": uint8 [N, H, W, C], "labels": float32 [N, C]}.

    Builds the dataset into `data_dir` on first use (offline for the embedded datasets).
    """
    import tensorflow_datasets as tfds

    import sdjax.datasets.mnist_mosaic  # noqa: F401  (registers the builder)

    if name not in DATASETS:
        raise ValueError(f"`name`: got {name!r}, expected one of {sorted(DATASETS)}.")
    builder_name, builder_config = DATASETS[name]
    builder = tfds.builder(
        f"{builder_name}/{builder_config}", data_dir=data_dir or default_data_dir()
    )
    builder.download_and_prepare()
    if split not in builder.info.splits:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(builder.info.splits)}.")
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    order = np.argsort(arrays["index"]) if "index" in arrays else slice(None)
    return {"image": arrays["image"][order], "labels": arrays["labels"][order].astype(np.float32)}


def batch_indices(
    num_examples: int,
    *,
    global_batch_size: int,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This host's example indices for global batch `step`: a pure function of (seed, step).

    Epoch e = step // (num_examples // global_batch_size) visits a fresh permutation (seeded by
    (seed, e)); the remainder of each epoch is dropped. Host p of P gets the p-th contiguous
    slice of the global batch.
    """
    if global_batch_size < 1 or global_batch_size > num_examples:
        raise ValueError(
            f"`global_batch_size`: got {global_batch_size}, expected 1..{num_examples} "
            "(the number of examples)."
        )
    if process_count < 1 or global_batch_size % process_count:
        raise ValueError(
            f"`process_count`: got {process_count}, expected a divisor of the global batch "
            f"size {global_batch_size}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"`process_index`: got {process_index}, expected 0..{process_count - 1}.")
    if step < 0:
        raise ValueError(f"`step`: got {step}, expected >= 0.")
    steps_per_epoch = num_examples // global_batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(num_examples)
    batch = order[position * global_batch_size : (position + 1) * global_batch_size]
    per_host = global_batch_size // process_count
    return batch[process_index * per_host : (process_index + 1) * per_host]


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
