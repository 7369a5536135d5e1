"""Reading prepared datasets: a builder's split by index (`tfds_source`), stacked into arrays
(`stack`) or left on disk and read when indexed (`StreamedInputs`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from absl import logging

from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

# Every dataset serves these; each dataset's module says how it carves "validation" (disjoint
# from "test") out of "train", and "train_without_validation" is the rest of "train".
SPLITS = ("train", "test", "validation", "train_without_validation")


def check_split(split: str) -> None:
    """Raises ValueError naming `split` unless it is one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(SPLITS)}.")


def default_data_dir() -> str:
    """Where datasets are built and read: $TFDS_DATA_DIR, or ~/.cache/sdjax/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or str(
        Path.home() / ".cache" / "sdjax" / "tensorflow_datasets"
    )


def tfds_source(builder_name: str, split: str, data_dir: str, source_dir: str = ""):
    """The random-access `tfds.data_source` of a local builder's split; builds it on first use.

    The local builders are registered with tfds by importing `sdjax.datasets`, which importing
    this module has done.
    """
    import tensorflow_datasets as tfds

    with no_stray_tfds_temp_dirs():
        builder = tfds.builder(
            builder_name, data_dir=data_dir, source_dir=source_dir, file_format="array_record"
        )
    if not builder.is_prepared():
        builder.download_and_prepare()
        logging.info("Built %s in %s.", builder_name, builder.data_dir)
    if split not in builder.info.splits:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(builder.info.splits)}.")
    # The local builders disable shuffling: files hold, and serve, their generation order.
    return builder.as_data_source(split=split)


def stack(examples) -> dict[str, np.ndarray]:
    """Every example of a random-access source, stacked: {feature: [N, ...]}."""
    items = [examples[i] for i in range(len(examples))]
    return {key: np.stack([item[key] for item in items]) for key in items[0]}


class StreamedInputs:
    """The inputs of a split, read from a random-access source when indexed; nothing is held.

    `inputs[indices]` (an index array or a slice) reads and stacks those examples, so it costs
    the memory of the examples asked for. `len`, `shape` and `dtype` are known without reading.

    Args:
      examples: a grain `MapDataset` (or any sequence) of example inputs, all of one shape.
    """

    def __init__(self, examples):
        self._examples = examples
        first = np.asarray(examples[0]) if len(examples) else np.zeros((0,))
        self.dtype = first.dtype
        self.shape = (len(examples), *first.shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        """The number of axes, as numpy's `ndim`."""
        return len(self.shape)

    def __getitem__(self, key) -> np.ndarray:
        indices = np.arange(len(self))[key]
        if indices.ndim != 1:
            raise TypeError(f"`key`: got {key!r}, expected a slice or a 1-D index array.")
        return np.stack([self._examples[int(i)] for i in indices]).astype(self.dtype, copy=False)

    def first(self, count: int) -> StreamedInputs:
        """The first `count` examples, still streamed."""
        return StreamedInputs(self._examples[:count])
