"""Fashion-MNIST mosaics: 2x2 grids of 28x28 clothing images from 1-4 distinct classes.

Train mosaics are built from the 60,000 Fashion-MNIST training images and test mosaics from the
10,000 test images, so no source image is shared. With a validation split (the builder's
`*with_validation` configs), 15% of each class's training images, a seeded choice, make the
validation mosaics and leave the training ones. The source files are the standard idx `.gz`
files, read from (in order):

1. `config.dataset.source_dir` (the builder's `source_dir`);
2. Debian's `dataset-fashion-mnist` package: /usr/share/datasets/fashion-mnist;
3. tfds `fashion_mnist`, if it is already prepared in the same data directory.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from sdjax.datasets import mosaic
from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

NUM_CLASSES = 10
IMAGE_SIZE = 28
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (the MNIST format, gzipped) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, num_dims = data[0] * 256 + data[1], data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (header {data[:4].hex()}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def has_idx_files(directory: str | Path) -> bool:
    return all((Path(directory) / name).exists() for names in IDX_FILES.values() for name in names)


@functools.cache
def load_source_images(split: str, source_dir: str = "", data_dir: str = "") -> tuple:
    """Fashion-MNIST `split` ("train" or "test"): uint8 [n, 28, 28], int64 [n]."""
    if split not in IDX_FILES:
        raise ValueError(f"`split`: got {split!r}, expected one of {sorted(IDX_FILES)}.")
    for directory in (source_dir, DEBIAN_DIR):
        if directory and has_idx_files(directory):
            images_file, labels_file = IDX_FILES[split]
            images = read_idx(Path(directory) / images_file)
            return images, read_idx(Path(directory) / labels_file).astype(np.int64)
    try:
        with no_stray_tfds_temp_dirs():
            builder = tfds.builder("fashion_mnist", data_dir=data_dir or None)
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        return arrays["image"][..., 0], arrays["label"].astype(np.int64)
    except Exception as error:  # any tfds failure here means "not prepared"
        raise FileNotFoundError(
            "Fashion-MNIST source files not found. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
            "--config.dataset.source_dir=DIR with the four idx .gz files "
            f"({', '.join(n for names in IDX_FILES.values() for n in names)}), or prepare "
            f"tfds `fashion_mnist` in the data dir. Looked in: {source_dir or '(none)'}, "
            f"{DEBIAN_DIR}, tfds data dir {data_dir or '(default)'} ({error})."
        ) from None


def validation_sources(classes: np.ndarray, seed: int) -> np.ndarray:
    """Sorted indices of the training images set aside for validation mosaics: the first
    `mosaic.VALIDATION_SOURCE_FRACTION` of each class in a seeded permutation."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(classes == label))
        chosen.append(members[: round(mosaic.VALIDATION_SOURCE_FRACTION * len(members))])
    return np.sort(np.concatenate(chosen))


def make_fashion_mosaic(
    split: str,
    *,
    num_examples: int,
    seed: int = 0,
    source_dir: str = "",
    data_dir: str = "",
    with_validation: bool = False,
) -> dict[str, np.ndarray]:
    """`num_examples` mosaics from the `split` source images (arrays as `compose_mosaics`).

    `with_validation`: "validation" mosaics come from `validation_sources` of the training
    images and "train" mosaics from the other training images.
    """
    splits = ("train", "test", "validation") if with_validation else ("train", "test")
    if split not in splits:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(splits)}.")
    source_split = "test" if split == "test" else "train"
    images, classes = load_source_images(source_split, source_dir, data_dir)
    allowed = np.arange(len(classes))
    if with_validation and split != "test":
        held = validation_sources(classes, seed)
        allowed = held if split == "validation" else np.setdiff1d(allowed, held)
    return mosaic.compose_mosaics(
        images,
        classes,
        allowed,
        num_classes=NUM_CLASSES,
        num_examples=num_examples,
        split=split,
        seed=seed,
    )


class FashionMosaic(mosaic.MosaicBuilder):
    """tfds builder for Fashion-MNIST mosaics; reads local idx files, needs no network."""

    NUM_CLASSES = NUM_CLASSES
    CELL_SIZE = IMAGE_SIZE

    def make_split(self, split, num_examples, seed, with_validation):
        return make_fashion_mosaic(
            split,
            num_examples=num_examples,
            seed=seed,
            source_dir=self.source_dir,
            data_dir=str(self.data_dir_root),
            with_validation=with_validation,
        )
