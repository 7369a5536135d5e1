"""The datasets: their registry (`DATASETS`, `load_splits`, ...; sdjax.datasets.registry),
reading prepared data (sdjax.datasets.sources) and sdjax's local tfds builders, which
importing this package registers with tfds."""

from sdjax.datasets import debtags, fashion_mosaic, mnist_mosaic, yeast
from sdjax.datasets.registry import (
    DATASETS,
    OPTIONS,
    Dataset,
    DataUnavailable,
    MissingExtra,
    input_shape,
    label_statistics,
    load_split,
    load_splits,
    load_train_and_test,
    modality_of,
    run_splits,
)
from sdjax.datasets.sources import SPLITS, StreamedInputs, default_data_dir

__all__ = [
    "DATASETS",
    "OPTIONS",
    "SPLITS",
    "DataUnavailable",
    "Dataset",
    "MissingExtra",
    "StreamedInputs",
    "debtags",
    "default_data_dir",
    "fashion_mosaic",
    "input_shape",
    "label_statistics",
    "load_split",
    "load_splits",
    "load_train_and_test",
    "mnist_mosaic",
    "modality_of",
    "run_splits",
    "yeast",
]
