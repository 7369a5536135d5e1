"""2x2 mosaics of single-label images: a genuine multi-label image task from a classification set.

Each mosaic holds four cells drawn from 1-4 distinct classes; its label set is the set of classes
present, so every label is visible in the image. The MNIST and Fashion-MNIST mosaics share this
module and differ only in where their source images come from.

Each builder has configs with a validation split (`with_validation`, `tiny_with_validation`):
15% of the training source images are set aside, validation mosaics are made from them alone
and training mosaics from the rest, so no source image is shared between train, validation
and test. Their test mosaics are those of the configs without validation, bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from sdjax.datasets.local_source import LocalSourceBuilder

SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}
VALIDATION_SOURCE_FRACTION = 0.15  # of the training source images, with a validation split


def compose_mosaics(
    source_images: np.ndarray,
    source_classes: np.ndarray,
    allowed: np.ndarray,
    *,
    num_classes: int,
    num_examples: int,
    split: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """`num_examples` mosaics of `split` whose cells come from the source images in `allowed`.

    The draw is seeded by (seed, split), so train and test mosaics differ for one seed.

    Returns:
      {"image": uint8 [n, 2h, 2w, 1], "labels": float32 [n, num_classes] multi-hot,
       "source_index": int64 [n, 4], the source image of each cell (row-major)}.
    """
    if num_examples < 1:
        raise ValueError(f"`num_examples`: got {num_examples}, expected >= 1.")
    if split not in SPLIT_IDS:
        raise ValueError(f"`split`: got {split!r}, expected one of {sorted(SPLIT_IDS)}.")
    rng = np.random.default_rng((seed, SPLIT_IDS[split]))
    height, width = source_images.shape[1:3]
    by_class = [allowed[source_classes[allowed] == c] for c in range(num_classes)]
    images = np.zeros((num_examples, 2 * height, 2 * width, 1), np.uint8)
    labels = np.zeros((num_examples, num_classes), np.float32)
    sources = np.zeros((num_examples, 4), np.int64)
    for i in range(num_examples):
        num_distinct = rng.integers(1, 5)
        present = rng.choice(num_classes, num_distinct, replace=False)
        cell_classes = rng.permutation(
            np.concatenate([present, rng.choice(present, 4 - num_distinct)])
        )
        for cell, label in enumerate(cell_classes):
            source = rng.choice(by_class[label])
            row, col = divmod(cell, 2)
            rows = slice(row * height, (row + 1) * height)
            cols = slice(col * width, (col + 1) * width)
            images[i, rows, cols, 0] = source_images[source]
            sources[i, cell] = source
        labels[i, present] = 1.0
    return {"image": images, "labels": labels, "source_index": sources}


RELEASE_NOTES = {
    "1.3.0": "array_record files (random access); the image feature is named `inputs`.",
    "1.2.0": "Examples are stored in generation order (disable_shuffling); no `index` feature.",
    "1.1.0": "Examples carry an `index` feature that restores their generation order.",
}


class MosaicConfig(tfds.core.BuilderConfig):
    def __init__(
        self, *, num_train: int, num_test: int, num_validation: int = 0, seed: int = 0, **kwargs
    ):
        kwargs.setdefault("version", tfds.core.Version("1.3.0"))
        kwargs.setdefault("release_notes", RELEASE_NOTES)
        super().__init__(**kwargs)
        self.num_train, self.num_test, self.seed = num_train, num_test, seed
        self.num_validation = num_validation  # > 0: a validation split from its own sources


class MosaicBuilder(LocalSourceBuilder, skip_registration=True):  # type: ignore[call-arg]
    """Shared tfds plumbing; subclasses set the constants and implement `make_split`."""

    NUM_CLASSES: int
    CELL_SIZE: int
    BUILDER_CONFIGS = [  # noqa: RUF012 (tfds declares it as a list)
        MosaicConfig(name="default", num_train=10_000, num_test=2_000),
        MosaicConfig(name="tiny", num_train=256, num_test=256),
        MosaicConfig(
            name="with_validation", num_train=10_000, num_validation=2_000, num_test=2_000
        ),
        MosaicConfig(name="tiny_with_validation", num_train=256, num_validation=256, num_test=256),
    ]

    def make_split(
        self, split: str, num_examples: int, seed: int, with_validation: bool
    ) -> dict[str, np.ndarray]:
        """`num_examples` mosaics of `split`; `with_validation`: the source images of
        "train" exclude the validation split's."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        side = 2 * self.CELL_SIZE
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Image(shape=(side, side, 1)),
                    "labels": tfds.features.Tensor(shape=(self.NUM_CLASSES,), dtype=np.float32),
                }
            ),
            supervised_keys=("inputs", "labels"),
            disable_shuffling=True,  # stored, hence read, in generation order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # sources are local files or package data
        config = self.builder_config
        sizes = {"train": config.num_train, "test": config.num_test}
        if config.num_validation:
            sizes["validation"] = config.num_validation
        return {
            split: self._generate_examples(split, size, config.seed)
            for split, size in sizes.items()
        }

    def _generate_examples(self, split, num_examples, seed):
        with_validation = self.builder_config.num_validation > 0
        mosaics = self.make_split(split, num_examples, seed, with_validation)
        for i in range(num_examples):
            yield i, {"inputs": png_bytes(mosaics["image"][i]), "labels": mosaics["labels"][i]}


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 [H, W, 1] image as PNG, encoded by Pillow: tfds's own encoder needs TensorFlow.

    PNG is lossless, so the decoded pixels are the image's, whichever encoder wrote them.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")  # uint8 2-D: grayscale
    return buffer.getvalue()
