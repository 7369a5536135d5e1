"""The dataset registry: every dataset name a config can ask for, and how its splits load.

The data contract: every dataset gives a split as {"inputs": [N, ...], "labels": float32 [N, C]
multi-hot}, and its `Dataset.modality` (sdjax.modalities) says how inputs become encoder inputs
and views. sdjax's builders store examples in that form too (debtags's `inputs` is the text,
which its loader tokenises), in array_record files that `tfds.data_source` reads by index.

Splits: every dataset has "train" and "test", and a validation split carved from its training
data, disjoint from test: "validation" and "train_without_validation" (the rest of "train").
Each dataset's module documents its rule. `config.dataset.validation` makes a run train on
"train_without_validation"; `config.eval_split` says whether the evaluators score "validation"
alone (test is then never loaded) or "test" (with validation beside it); `run_splits` maps a
config to the splits it loads.

Small datasets are held in memory as numpy arrays. Streamed datasets (VOC, COCO) keep only their
labels in memory; `inputs` is a `StreamedInputs`, which reads and decodes the examples it is
indexed with, so per-host memory does not grow with the dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from sdjax.datasets import debtags, fashion_mosaic, mnist_mosaic, yeast
from sdjax.datasets.sources import (
    StreamedInputs,
    check_split,
    default_data_dir,
    stack,
    tfds_source,
)
from sdjax.modalities import IMAGE, TABULAR, TEXT, Modality


@dataclasses.dataclass(frozen=True)
class Dataset:
    """How to load one dataset name: a tfds builder or a `loader` of in-memory arrays.

    Attributes:
      modality: its model-input and view functions.
      input_shape: `(options) -> shape` of one example's inputs, known without loading them
        (the `OPTIONS` of `config.dataset` may size them); encoders take their input size
        from it.
      builder: a tfds builder whose examples are {"inputs", "labels"} (sdjax's local builders).
      loader: `(split, *, data_dir, source_dir, options) -> {"inputs", "labels"}`, for datasets
        that need more than a builder (text is tokenised; VOC and COCO are converted).
        A `loader` serves every split itself.
      streamed: whether `loader` returns `StreamedInputs` (it keeps only the labels in memory).
      validation_builder: a builder whose "train" and "validation" splits are this dataset's
        "train_without_validation" and "validation" (the mosaics, made from disjoint sources).
      validation_positions: `() -> int array`, the sorted positions in "train" of the
        validation examples, for builders whose validation is a subset of "train".
      train_size: the examples of the "train" split, known without loading it, so that a batch
        larger than the dataset is refused before any data loads; None when only the data
        knows (debtags: the machine's apt lists decide). With `dataset.validation` training
        gets fewer, which is checked once they are loaded.
      tiny: the dataset that the config files' "tiny" profile trains on instead (a small
        build of the same data); "" = this one.
    """

    modality: Modality
    input_shape: Callable[[dict], tuple[int, ...]]
    builder: str = ""
    loader: Callable[..., dict] | None = None
    streamed: bool = False
    validation_builder: str = ""
    validation_positions: Callable[[], np.ndarray] | None = None
    train_size: int | None = None
    tiny: str = ""


class DataUnavailable(FileNotFoundError):
    """A dataset's source files are missing; the message says what to get and where."""


class MissingExtra(ImportError):
    """A dataset needs a package that the installed extras lack; the message names the extra."""


def _tfds_multilabel_loader(name: str) -> Callable[..., dict]:
    def load(split, *, data_dir, source_dir, options):
        try:
            from sdjax.datasets import tfds_multilabel
        except ModuleNotFoundError as error:
            if error.name != "tensorflow":
                raise
            raise MissingExtra(
                f"config.dataset.name: {name!r} needs TensorFlow to prepare and decode its "
                "images, and it is not installed: pip install 'sdjax[prepare]'."
            ) from None

        del source_dir  # the real tfds builders download into data_dir themselves
        return tfds_multilabel.streamed_split(
            name, split, data_dir=data_dir, image_size=options.get("image_size", 224)
        )

    return load


def _rgb_shape(options: dict) -> tuple[int, ...]:
    size = options.get("image_size", 224)
    return (size, size, 3)


def _mosaic(builder: str, size: str, tile_size: int, train_size: int, tiny: str = "") -> Dataset:
    """A mosaic dataset: 2x2 grids of grey tiles, from builder config `size` ("default" or
    "tiny"), whose validation split comes from its twin config made with one."""
    return Dataset(
        IMAGE,
        lambda options: (2 * tile_size, 2 * tile_size, 1),
        f"{builder}/{size}",
        validation_builder=f"{builder}/{'' if size == 'default' else size + '_'}with_validation",
        train_size=train_size,
        tiny=tiny,
    )


# The train sizes: the builders' own (tests check them), VOC 2007's train+validation and COCO
# 2017's train images as tfds builds them.
DATASETS = {
    "mnist_mosaic": _mosaic(
        "mnist_mosaic", "default", mnist_mosaic.DIGIT_SIZE, 10_000, tiny="mnist_mosaic_tiny"
    ),
    "mnist_mosaic_tiny": _mosaic("mnist_mosaic", "tiny", mnist_mosaic.DIGIT_SIZE, 256),
    "fashion_mosaic": _mosaic(
        "fashion_mosaic", "default", fashion_mosaic.IMAGE_SIZE, 10_000, tiny="fashion_mosaic_tiny"
    ),
    "fashion_mosaic_tiny": _mosaic("fashion_mosaic", "tiny", fashion_mosaic.IMAGE_SIZE, 256),
    "yeast": Dataset(
        TABULAR,
        lambda options: (yeast.NUM_FEATURES,),
        "yeast",
        validation_positions=yeast.validation_positions,
        train_size=yeast.NUM_TRAIN,
    ),
    "debtags": Dataset(
        TEXT, lambda options: (options.get("max_length", 128),), loader=debtags.load_tokens
    ),
    "voc2007": Dataset(
        IMAGE,
        _rgb_shape,
        loader=_tfds_multilabel_loader("voc2007"),
        streamed=True,
        train_size=5_011,
    ),
    "coco2017": Dataset(
        IMAGE,
        _rgb_shape,
        loader=_tfds_multilabel_loader("coco2017"),
        streamed=True,
        train_size=118_287,
    ),
}
OPTIONS = ("vocab_size", "max_length", "case_fold", "image_size")  # per-modality loading options


def run_splits(config) -> dict[str, str]:
    """{role: split} that a run of `config` loads: "train" always, and the scored ones.

    Without `config.dataset.validation`: train on "train", score "test". With it: train on
    "train_without_validation", score "validation", and "test" too when `config.eval_split`
    is "test"; with `eval_split = "validation"` test is not loaded at all.
    """
    if not config.dataset.get("validation", False):
        return {"train": "train", "test": "test"}
    roles = {"train": "train_without_validation", "validation": "validation"}
    if config.get("eval_split", "test") == "test":
        roles["test"] = "test"
    return roles


def modality_of(config: ml_collections.ConfigDict) -> Modality:
    """The modality of `config.dataset.name`: its model-input and view functions."""
    return DATASETS[config.dataset.name].modality


def input_shape(dataset_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one example's inputs for `config.dataset`, without loading any."""
    options = {key: dataset_config[key] for key in OPTIONS if key in dataset_config}
    return DATASETS[dataset_config.name].input_shape(options)


def label_statistics(labels: np.ndarray) -> dict:
    """Samples, labels, label cardinality and the per-label frequency of a multi-hot matrix."""
    counts = labels.sum(axis=0).astype(int)
    return {
        "samples": int(labels.shape[0]),
        "labels": int(labels.shape[1]),
        "cardinality": float(labels.sum(axis=1).mean()),
        "label_counts": counts.tolist(),
    }


def load_split(
    name: str, split: str, *, data_dir: str = "", source_dir: str = "", **options
) -> dict[str, np.ndarray]:
    """A whole split as numpy arrays: {"inputs": [N, ...], "labels": float32 [N, C]}.

    `inputs` is uint8 [N, H, W, C] for images, float32 [N, F] for tabular data and int32 token
    ids [N, L] for text; for a `streamed` dataset it is a `StreamedInputs` that reads examples
    when indexed. Builds the dataset into `data_dir` on first use (offline for the
    embedded datasets). `load_train_and_test` logs each split's statistics as it loads it, so
    the first build's are printed too; `label_statistics` computes them.

    Args:
      name: a key of DATASETS.
      split: one of SPLITS: "train", "test", "validation" or "train_without_validation".
      data_dir: the tfds data directory; "" = $TFDS_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets.
      source_dir: where a builder finds its local source files; "" = the builder's default
        (see its module docstring).
      **options: `vocab_size`, `max_length`, `case_fold` (text) and `image_size` (tfds images).
    """
    if name not in DATASETS:
        raise ValueError(f"`name`: got {name!r}, expected one of {sorted(DATASETS)}.")
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise ValueError(f"options: got {unknown}, expected only {list(OPTIONS)}.")
    check_split(split)
    dataset = DATASETS[name]
    data_dir = data_dir or default_data_dir()
    carved = split in ("validation", "train_without_validation")
    if dataset.loader is not None:
        arrays = dataset.loader(split, data_dir=data_dir, source_dir=source_dir, options=options)
    elif carved and dataset.validation_builder:
        stored = "validation" if split == "validation" else "train"
        arrays = stack(tfds_source(dataset.validation_builder, stored, data_dir, source_dir))
    elif carved and dataset.validation_positions is not None:
        arrays = stack(tfds_source(dataset.builder, "train", data_dir, source_dir))
        held = np.zeros(len(arrays["labels"]), bool)
        held[dataset.validation_positions()] = True
        arrays = {key: value[held == (split == "validation")] for key, value in arrays.items()}
    elif carved:
        raise ValueError(f"`split`: got {split!r}, but dataset {name!r} has no validation split.")
    else:
        arrays = stack(tfds_source(dataset.builder, split, data_dir, source_dir))
    arrays["labels"] = arrays["labels"].astype(np.float32)
    return arrays


def load_splits(
    dataset_config: ml_collections.ConfigDict, roles: dict[str, str]
) -> dict[str, dict[str, Any]]:
    """{role: split arrays} for `config.dataset`, e.g. roles = `run_splits(config)`.

    The "train" role is cut to `train_examples` and every other role to `test_examples` when
    that is > 0: the first ones in the fixed order, the same subset on every run.

    Raises:
      DataUnavailable: the dataset's source files are missing (the message says which, where).
    """
    fields = dataset_config.to_dict()
    limits = {"train": fields.pop("train_examples", 0)}
    heldout_limit = fields.pop("test_examples", 0)
    fields.pop("validation", None)  # which splits to load is `roles`'s business
    name = fields.pop("name")
    loaded = {}
    for role, split in roles.items():
        try:
            arrays = load_split(name, split, **fields)
        except FileNotFoundError as error:  # the loaders' "get these files, put them there"
            raise DataUnavailable(str(error)) from error
        limit = limits.get(role, heldout_limit)
        if limit:
            arrays = {key: _first(value, limit, key) for key, value in arrays.items()}
        logging.info("%s %s: %s", name, split, _describe(label_statistics(arrays["labels"])))
        loaded[role] = arrays
    return loaded


def load_train_and_test(
    dataset_config: ml_collections.ConfigDict,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """ "train" and "test" for `config.dataset`, cut as `load_splits` cuts them."""
    loaded = load_splits(dataset_config, {"train": "train", "test": "test"})
    return loaded["train"], loaded["test"]


def _first(value, limit: int, key: str):
    if key not in ("inputs", "labels"):
        return value
    return value.first(limit) if isinstance(value, StreamedInputs) else value[:limit]


def _describe(stats: dict) -> str:
    return (
        f"{stats['samples']} samples, {stats['labels']} labels, "
        f"cardinality {stats['cardinality']:.2f}, label counts {stats['label_counts']}"
    )
