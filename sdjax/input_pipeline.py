"""One input path for every dataset: tfds builders, held in memory, sampled by (seed, step).

The datasets here fit in host memory, so a split is loaded once as numpy arrays. The order of
batches is a pure function of (seed, step), which makes a resumed run see exactly the data an
uninterrupted run would, and each host takes its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sdjax.tokenizer import PAD_ID

MODALITIES = ("image", "tabular", "text")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """How to load one dataset name: a local tfds builder (`builder`, `inputs_key`) or `loader`."""

    modality: str  # one of MODALITIES: picks the input preparation and the views
    builder: str = ""
    inputs_key: str = ""
    loader: Callable[..., dict[str, np.ndarray]] | None = None


def debtags_corpus(data_dir: str = "", source_dir: str = "") -> tuple[dict, list[str]]:
    """Debtags texts and multi-hot tags: ({split: (texts, float32 [N, C])}, the C tag names).

    The columns are the sorted tags of both splits, so train and test share them.
    """
    from sklearn.preprocessing import MultiLabelBinarizer

    data_dir = data_dir or default_data_dir()
    splits = {s: _read_tfds("debtags/default", s, data_dir, source_dir) for s in ("train", "test")}
    tag_lists = {s: [t.decode().split(", ") for t in splits[s]["tags"]] for s in splits}
    binarizer = MultiLabelBinarizer().fit(tag_lists["train"] + tag_lists["test"])  # sorts tags
    corpus = {
        split: (
            [t.decode() for t in splits[split]["text"]],
            binarizer.transform(tag_lists[split]).astype(np.float32),
        )
        for split in splits
    }
    return corpus, binarizer.classes_.tolist()


def _load_debtags(split: str, *, data_dir: str, source_dir: str, options: dict) -> dict:
    """Debtags token ids (SentencePiece trained on the train split) and multi-hot tags."""
    from sdjax import tokenizer

    corpus, vocabulary = debtags_corpus(data_dir, source_dir)
    model_path = tokenizer.cached_tokenizer(
        corpus["train"][0],
        vocab_size=options.get("vocab_size", 8000),
        cache_dir=Path(data_dir) / "sdjax_tokenizers",
    )
    texts, labels = corpus[split]
    inputs = tokenizer.encode(model_path, texts, max_length=options.get("max_length", 128))
    return {"inputs": inputs, "labels": labels, "label_names": np.array(vocabulary)}


def _tfds_multilabel_loader(name: str) -> Callable[..., dict]:
    def load(split, *, data_dir, source_dir, options):
        from sdjax.datasets import tfds_multilabel

        del source_dir  # the real tfds builders download into data_dir themselves
        return tfds_multilabel.load_tfds_multilabel(
            name, split, data_dir=data_dir, image_size=options.get("image_size", 224)
        )

    return load


DATASETS = {
    "mnist_mosaic": Dataset("image", "mnist_mosaic/default", "image"),
    "mnist_mosaic_tiny": Dataset("image", "mnist_mosaic/tiny", "image"),
    "fashion_mosaic": Dataset("image", "fashion_mosaic/default", "image"),
    "fashion_mosaic_tiny": Dataset("image", "fashion_mosaic/tiny", "image"),
    "yeast": Dataset("tabular", "yeast", "features"),
    "debtags": Dataset("text", loader=_load_debtags),
    "voc2007": Dataset("image", loader=_tfds_multilabel_loader("voc2007")),
    "coco2017": Dataset("image", loader=_tfds_multilabel_loader("coco2017")),
}
OPTIONS = ("vocab_size", "max_length", "image_size")  # per-modality loading options


def default_data_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or str(
        Path.home() / ".cache" / "sdjax" / "tensorflow_datasets"
    )


def label_statistics(labels: np.ndarray) -> dict:
    """Samples, labels, label cardinality and the per-label frequency of a multi-hot matrix."""
    counts = labels.sum(axis=0).astype(int)
    return {
        "samples": int(labels.shape[0]),
        "labels": int(labels.shape[1]),
        "cardinality": float(labels.sum(axis=1).mean()),
        "label_counts": counts.tolist(),
    }


def _read_tfds(builder_name: str, split: str, data_dir: str, source_dir: str) -> dict:
    import tensorflow_datasets as tfds

    import sdjax.datasets  # noqa: F401  (registers the local builders)
    from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

    with no_stray_tfds_temp_dirs():
        builder = tfds.builder(builder_name, data_dir=data_dir, source_dir=source_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
        logging.info("Built %s in %s.", builder_name, builder.data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(builder.info.splits)}.")
    # The local builders disable shuffling: files hold, and serve, their generation order.
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))


def load_split(
    name: str, split: str, *, data_dir: str = "", source_dir: str = "", **options
) -> dict[str, np.ndarray]:
    """A whole split as numpy arrays: {"inputs": [N, ...], "labels": float32 [N, C]}.

    `inputs` is uint8 [N, H, W, C] for images, float32 [N, F] for tabular data and int32 token
    ids [N, L] for text. Builds the dataset into `data_dir` on first use (offline for the
    embedded datasets). `load_train_and_test` logs each split's statistics as it loads it, so
    the first build's are printed too; `label_statistics` computes them.

    Args:
      name: a key of DATASETS.
      split: "train" or "test".
      data_dir: the tfds data directory; "" = $TFDS_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets.
      source_dir: where a builder finds its local source files; "" = the builder's default
        (see its module docstring).
      **options: `vocab_size`, `max_length` (text) and `image_size` (tfds images).
    """
    if name not in DATASETS:
        raise ValueError(f"`name`: got {name!r}, expected one of {sorted(DATASETS)}.")
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise ValueError(f"options: got {unknown}, expected only {list(OPTIONS)}.")
    dataset = DATASETS[name]
    data_dir = data_dir or default_data_dir()
    if dataset.loader is not None:
        arrays = dataset.loader(split, data_dir=data_dir, source_dir=source_dir, options=options)
    else:
        raw = _read_tfds(dataset.builder, split, data_dir, source_dir)
        arrays = {"inputs": raw[dataset.inputs_key], "labels": raw["labels"]}
    arrays["labels"] = arrays["labels"].astype(np.float32)
    return arrays


def load_train_and_test(dataset_config) -> tuple[dict, dict]:
    """Both splits for `config.dataset`, each cut to its `*_examples` limit when that is > 0."""
    fields = dataset_config.to_dict()
    limits = {"train": fields.pop("train_examples", 0), "test": fields.pop("test_examples", 0)}
    name = fields.pop("name")
    splits = []
    for split, limit in limits.items():
        arrays = load_split(name, split, **fields)
        if limit:  # the first `limit` in the fixed order: the same subset on every run
            arrays = {
                key: value[:limit] if key in ("inputs", "labels") else value
                for key, value in arrays.items()
            }
        logging.info("%s %s: %s", name, split, _describe(label_statistics(arrays["labels"])))
        splits.append(arrays)
    return splits[0], splits[1]


def _describe(stats: dict) -> str:
    return (
        f"{stats['samples']} samples, {stats['labels']} labels, "
        f"cardinality {stats['cardinality']:.2f}, label counts {stats['label_counts']}"
    )


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


def model_inputs(modality: str, inputs: np.ndarray) -> np.ndarray:
    """Host arrays -> what the encoder takes: images in [0, 1], features and token ids as is."""
    if modality == "image":
        return to_float(inputs)
    if modality in ("tabular", "text"):
        return inputs
    raise ValueError(f"`modality`: got {modality!r}, expected one of {MODALITIES}.")


TABULAR_NOISE_STD = 0.1  # features are standardised, so this is a tenth of a feature's spread
TABULAR_DROPOUT = 0.1
TOKEN_DROPOUT = 0.1


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


def make_views(modality: str, rng: jax.Array, inputs: jax.Array, num_views: int) -> jax.Array:
    """`num_views` augmented views per example, [B, ...] -> [B, V, ...], for `modality`."""
    views = {"image": augment_views, "tabular": tabular_views, "text": text_views}
    if modality not in views:
        raise ValueError(f"`modality`: got {modality!r}, expected one of {MODALITIES}.")
    return views[modality](rng, inputs, num_views=num_views)
