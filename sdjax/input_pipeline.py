"""One input path for every dataset: tfds builders in array_record, sampled by (seed, step).

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

`HostBatches` serves training batches through grain: the order of batches is a pure function of
(seed, step) (`batch_indices`), which makes a resumed run see exactly the data an uninterrupted
run would, and each host reads only its own slice of every global batch. Its iterator state is
the step, which every checkpoint already holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from sdjax.modalities import IMAGE, TABULAR, TEXT, Modality, to_float

__all__ = ["to_float"]  # re-exported: image tests convert with it


@dataclasses.dataclass(frozen=True)
class Dataset:
    """How to load one dataset name: a tfds builder or a `loader` of in-memory arrays.

    Attributes:
      modality: its model-input and view functions.
      builder: a tfds builder whose examples are {"inputs", "labels"} (sdjax's local builders).
      loader: `(split, *, data_dir, source_dir, options) -> {"inputs", "labels"}`, for datasets
        that need more than a builder (text is tokenised; VOC and COCO are converted).
      streamed: whether `loader` returns `StreamedInputs` (it keeps only the labels in memory).
      validation_builder: a builder whose "train" and "validation" splits are this dataset's
        "train_without_validation" and "validation" (the mosaics, made from disjoint sources).
      validation_positions: `() -> int array`, the sorted positions in "train" of the
        validation examples, for builders whose validation is a subset of "train".
      A `loader` serves every split itself.
      train_size: the examples of the "train" split, known without loading it, so that a batch
        larger than the dataset is refused before any data loads; None when only the data
        knows (debtags: the machine's apt lists decide). With `dataset.validation` training
        gets fewer, which is checked once they are loaded.
    """

    modality: Modality
    builder: str = ""
    loader: Callable[..., dict] | None = None
    streamed: bool = False
    validation_builder: str = ""
    validation_positions: Callable[[], np.ndarray] | None = None
    train_size: int | None = None


class DataUnavailable(FileNotFoundError):
    """A dataset's source files are missing; the message says what to get and where."""


SPLITS = ("train", "test", "validation", "train_without_validation")


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(SPLITS)}.")


def debtags_corpus(
    data_dir: str = "", source_dir: str = "", splits=("train", "test")
) -> tuple[dict, list[str]]:
    """Debtags texts and multi-hot tags: ({split: (texts, float32 [N, C])}, the C tag names).

    All come from the builder as they are stored; every split shares the tag columns.
    "validation" holds the training packages that `debtags.is_validation_package` picks, and
    "train_without_validation" the others, in the stored (name) order.
    """
    from sdjax.datasets.debtags import is_validation_package

    data_dir = data_dir or default_data_dir()
    corpus = {}
    for split in splits:
        _check_split(split)
        source = tfds_source(
            "debtags/default", "test" if split == "test" else "train", data_dir, source_dir
        )
        examples = _stack(source)
        keep = np.arange(len(examples["labels"]))
        if split in ("validation", "train_without_validation"):
            held = np.array([is_validation_package(name.decode()) for name in examples["package"]])
            keep = keep[held == (split == "validation")]
        texts = [examples["inputs"][i].decode() for i in keep]
        corpus[split] = (texts, examples["labels"][keep])
    return corpus, list(source.dataset_info.metadata["tags"])


def _load_debtags(split: str, *, data_dir: str, source_dir: str, options: dict) -> dict:
    """Debtags token ids (SentencePiece trained on the train split) and multi-hot tags.

    The tokenizer is the same for every split (trained on all of "train", texts without
    labels), so a test example has the same tokens with a validation split and without.
    """
    from sdjax import tokenizer

    corpus, vocabulary = debtags_corpus(data_dir, source_dir, dict.fromkeys(("train", split)))
    model_path = tokenizer.cached_tokenizer(
        corpus["train"][0],
        vocab_size=options.get("vocab_size", 8000),
        cache_dir=Path(data_dir) / "sdjax_tokenizers",
        case_fold=options.get("case_fold", False),
    )
    texts, labels = corpus[split]
    inputs = tokenizer.encode(model_path, texts, max_length=options.get("max_length", 128))
    return {"inputs": inputs, "labels": labels, "label_names": np.array(vocabulary)}


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


def _yeast_validation_positions() -> np.ndarray:
    from sdjax.datasets import yeast

    return yeast.validation_positions()


# The train sizes: the builders' own (tests check them), VOC 2007's train+validation and COCO
# 2017's train images as tfds builds them.
DATASETS = {
    "mnist_mosaic": Dataset(
        IMAGE,
        "mnist_mosaic/default",
        validation_builder="mnist_mosaic/with_validation",
        train_size=10_000,
    ),
    "mnist_mosaic_tiny": Dataset(
        IMAGE,
        "mnist_mosaic/tiny",
        validation_builder="mnist_mosaic/tiny_with_validation",
        train_size=256,
    ),
    "fashion_mosaic": Dataset(
        IMAGE,
        "fashion_mosaic/default",
        validation_builder="fashion_mosaic/with_validation",
        train_size=10_000,
    ),
    "fashion_mosaic_tiny": Dataset(
        IMAGE,
        "fashion_mosaic/tiny",
        validation_builder="fashion_mosaic/tiny_with_validation",
        train_size=256,
    ),
    "yeast": Dataset(
        TABULAR, "yeast", validation_positions=_yeast_validation_positions, train_size=1_500
    ),
    "debtags": Dataset(TEXT, loader=_load_debtags),
    "voc2007": Dataset(
        IMAGE, loader=_tfds_multilabel_loader("voc2007"), streamed=True, train_size=5_011
    ),
    "coco2017": Dataset(
        IMAGE, loader=_tfds_multilabel_loader("coco2017"), streamed=True, train_size=118_287
    ),
}
OPTIONS = ("vocab_size", "max_length", "case_fold", "image_size")  # per-modality loading options


def default_data_dir() -> str:
    """Where datasets are built and read: $TFDS_DATA_DIR, or ~/.cache/sdjax/tensorflow_datasets."""
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


def tfds_source(builder_name: str, split: str, data_dir: str, source_dir: str = ""):
    """The random-access `tfds.data_source` of a local builder's split; builds it on first use."""
    import tensorflow_datasets as tfds

    import sdjax.datasets  # noqa: F401  (registers the local builders)
    from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

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


def _stack(examples) -> dict[str, np.ndarray]:
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
    _check_split(split)
    dataset = DATASETS[name]
    data_dir = data_dir or default_data_dir()
    carved = split in ("validation", "train_without_validation")
    if dataset.loader is not None:
        arrays = dataset.loader(split, data_dir=data_dir, source_dir=source_dir, options=options)
    elif carved and dataset.validation_builder:
        stored = "validation" if split == "validation" else "train"
        arrays = _stack(tfds_source(dataset.validation_builder, stored, data_dir, source_dir))
    elif carved and dataset.validation_positions is not None:
        arrays = _stack(tfds_source(dataset.builder, "train", data_dir, source_dir))
        held = np.zeros(len(arrays["labels"]), bool)
        held[dataset.validation_positions()] = True
        arrays = {key: value[held == (split == "validation")] for key, value in arrays.items()}
    elif carved:
        raise ValueError(f"`split`: got {split!r}, but dataset {name!r} has no validation split.")
    else:
        arrays = _stack(tfds_source(dataset.builder, split, data_dir, source_dir))
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


STREAM_PREFETCH = 4  # steps read ahead, each by its own thread: decoding overlaps training


class HostBatches:
    """`host_batch(step)`: this host's slice of global batch `step`, ready for the encoder.

    A grain `MapDataset` over steps: step -> `batch_indices(...)` -> those examples, with the
    modality's `model_inputs` applied. In-memory inputs are gathered with numpy (the batches
    every committed result was trained on); `StreamedInputs` read only this host's examples,
    and `prefetch` threads read the next steps ahead. The iterator's state is the step: a run
    resumed at step s asks for `host_batch(s)` and gets what an uninterrupted run got.

    Args:
      split: {"inputs", "labels"}, e.g. from `load_train_and_test`.
      modality: the dataset's `Modality`.
      global_batch_size, seed, process_index, process_count: as in `batch_indices`.
      prefetch: steps read ahead by as many threads; 0 reads each step when asked.
    """

    def __init__(
        self,
        split: dict,
        modality: Modality,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 0,
    ):
        self._inputs, self._labels = split["inputs"], split["labels"]
        self._modality = modality
        self._indices = dict(
            global_batch_size=global_batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        batch_indices(len(self._labels), step=0, **self._indices)  # checks the arguments
        self._prefetch = prefetch
        self._steps = grain.MapDataset.range(0, 2**62).map(self._read)
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None
        self._next_step: int | None = None

    def _read(self, step: int) -> dict[str, np.ndarray]:
        indices = batch_indices(len(self._labels), step=step, **self._indices)
        return {
            "inputs": self._modality.model_inputs(self._inputs[indices]),
            "labels": self._labels[indices],
        }

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """{"inputs": this host's encoder inputs, "labels": their multi-hot labels} of `step`."""
        if not self._prefetch:
            return self._steps[step]
        if self._iterator is None or step != self._next_step:  # a start, or a jump: read ahead
            read_options = grain.ReadOptions(
                num_threads=self._prefetch, prefetch_buffer_size=self._prefetch
            )
            self._iterator = iter(self._steps[step:].to_iter_dataset(read_options))
        self._next_step = step + 1
        return next(self._iterator)


def modality_of(config: ml_collections.ConfigDict) -> Modality:
    """The modality of `config.dataset.name`: its model-input and view functions."""
    return DATASETS[config.dataset.name].modality


def training_batches(config: ml_collections.ConfigDict, train: dict[str, Any]) -> HostBatches:
    """The `HostBatches` of stage 1 for `config`, on this process; streamed data reads ahead."""
    dataset = DATASETS[config.dataset.name]
    return HostBatches(
        train,
        dataset.modality,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=STREAM_PREFETCH if dataset.streamed else 0,
    )
