"""Yeast: the MULAN multi-label benchmark (2,417 genes, 103 features, 14 functional classes).

The data is the copy that `river` ships (`river/datasets/yeast.csv.gz`). MULAN's own split is not
in that file, so the split here is a fixed, seeded permutation with MULAN's sizes: 1,500 train
and 917 test genes. Features are standardised with the training split's mean and std.

Validation (`validation_positions`): 300 of the 1,500 training genes, a fixed seeded choice,
carved out of the training split by the input pipeline when a config asks for a validation
split (`config.dataset.validation`). The standardisation statistics stay those of all 1,500
training rows (features only, no labels), so the stored data is the same in both cases.
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import tensorflow_datasets as tfds

from sdjax.datasets.local_source import LocalSourceBuilder

NUM_FEATURES = 103
NUM_CLASSES = 14
NUM_TRAIN = 1500
NUM_VALIDATION = 300
SPLIT_SEED = 0
VALIDATION_SEED = 1


@functools.cache
def load_table() -> tuple[np.ndarray, np.ndarray]:
    """All 2,417 genes in file order: float32 features [2417, 103], float32 labels [2417, 14]."""
    source = importlib.resources.files("river") / "datasets" / "yeast.csv.gz"
    with importlib.resources.as_file(source) as path:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return (
        table[:, :NUM_FEATURES].astype(np.float32),
        table[:, NUM_FEATURES:].astype(np.float32),
    )


def split_indices(split: str, seed: int = SPLIT_SEED) -> np.ndarray:
    """Row indices of `split`; train and test partition the 2,417 genes."""
    order = np.random.default_rng(seed).permutation(len(load_table()[0]))
    if split == "train":
        return np.sort(order[:NUM_TRAIN])
    if split == "test":
        return np.sort(order[NUM_TRAIN:])
    raise ValueError(f"`split`: got {split!r}, expected 'train' or 'test'.")


def validation_positions(seed: int = VALIDATION_SEED) -> np.ndarray:
    """Sorted positions, within the train split (its rows in order), of the 300 validation genes."""
    return np.sort(np.random.default_rng(seed).permutation(NUM_TRAIN)[:NUM_VALIDATION])


def make_split(split: str, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """{"features": float32 [n, 103] standardised, "labels": float32 [n, 14], "row": int64 [n]}."""
    features, labels = load_table()
    train_rows = split_indices("train", seed)
    mean = features[train_rows].mean(axis=0)
    std = features[train_rows].std(axis=0) + 1e-6
    rows = split_indices(split, seed)
    return {
        "features": ((features[rows] - mean) / std).astype(np.float32),
        "labels": labels[rows],
        "row": rows.astype(np.int64),
    }


class Yeast(LocalSourceBuilder):
    """tfds builder for Yeast from river's copy; needs no network."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {  # noqa: RUF012 (tfds declares a dict)
        "1.2.0": "array_record files (random access); the features are named `inputs`.",
        "1.1.0": "Examples are stored in row order (disable_shuffling); no `index` feature.",
        "1.0.0": "Examples carry an `index` feature, their row in the source file.",
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "inputs": tfds.features.Tensor(shape=(NUM_FEATURES,), dtype=np.float32),
                    "labels": tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.float32),
                }
            ),
            supervised_keys=("inputs", "labels"),
            disable_shuffling=True,  # stored, hence read, in row order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything comes from the river wheel; source_dir is unused
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split):
        arrays = make_split(split)
        for features, labels, row in zip(
            arrays["features"], arrays["labels"], arrays["row"], strict=True
        ):
            yield int(row), {"inputs": features, "labels": labels}
