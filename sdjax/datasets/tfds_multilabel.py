"""Multi-label image classification arrays from the tensorflow-datasets VOC 2007 and COCO 2017.

Labels:
  * ``voc2007`` (``voc/2007``, 20 classes): the tfds ``labels`` feature, i.e. the set of classes
    of all objects in the image. tfds ``labels`` *includes* objects flagged 'difficult' (tfds
    also has ``labels_no_difficult``); we keep them as positives: a hard-to-see object is still
    in the image.
  * ``coco2017`` (``coco/2017``, 80 classes): the set of ``objects/label`` categories in the image,
    crowd annotations included. About 1% of COCO 2017 images have no objects at all; they are kept,
    with an all-zero label row.

Images are plainly resized (bilinear, antialiased, aspect ratio not kept) to
``image_size x image_size x 3`` uint8. We do not centre-crop: a crop can cut out an object whose
label the image still carries.

Our split names are "train" and "test": VOC 2007 "train+validation" / "test", COCO 2017
"train" / "validation" (the COCO 2017 test split has no labels). With a validation split
(`config.dataset.validation`), "validation" is VOC 2007's own "validation" split and the first
5,000 images of COCO 2017 "train" in tfds's file order (which tfds shuffled when it prepared the
data), and "train_without_validation" is the rest of the training images: VOC 2007 "train",
COCO 2017 "train[5000:]".

Training streams these datasets (`streamed_split`): tfds prepares them as array_record files, and
examples are read, decoded and resized when a batch asks for them, so only the labels stay in
memory. `load_tfds_multilabel` reads a whole split into memory instead (tests, statistics).

Offline: tfds downloads the source archives on first use. Without network, put them (the files
the error message lists) in tfds's manual dir, ``DATA_DIR/downloads/manual``, and tfds builds
from there; the loader checks this up front rather than letting tfds retry for minutes.
"""

from __future__ import annotations

import dataclasses
import socket
import urllib.parse
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import resource as tfds_resource

from sdjax.datasets.local_source import no_stray_tfds_temp_dirs
from sdjax.datasets.sources import StreamedInputs

_BATCH_SIZE = 256
_CONNECT_TIMEOUT_S = 5.0
COCO_VALIDATION_IMAGES = 5000


@dataclasses.dataclass(frozen=True)
class TfdsMultilabel:
    """Where a multi-label dataset lives in tfds and how to read its labels."""

    tfds_name: str
    num_classes: int
    train_split: str
    test_split: str
    validation_split: str  # a slice of `train_split`, disjoint from the next
    train_without_validation_split: str
    label_key: tuple[str, ...]  # Path to the int class-id sequence in a tfds example.
    source_files: tuple[str, ...]  # The archives tfds downloads to build every split.


TFDS_MULTILABEL = {
    "voc2007": TfdsMultilabel(
        tfds_name="voc/2007",
        num_classes=20,
        train_split="train+validation",
        test_split="test",
        validation_split="validation",
        train_without_validation_split="train",
        label_key=("labels",),
        source_files=("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"),
    ),
    "coco2017": TfdsMultilabel(
        tfds_name="coco/2017",
        num_classes=80,
        train_split="train",
        test_split="validation",
        validation_split=f"train[:{COCO_VALIDATION_IMAGES}]",
        train_without_validation_split=f"train[{COCO_VALIDATION_IMAGES}:]",
        label_key=("objects", "label"),
        # tfds builds the unlabelled test split too, so it needs the test archives.
        source_files=(
            "train2017.zip",
            "val2017.zip",
            "test2017.zip",
            "annotations_trainval2017.zip",
            "image_info_test2017.zip",
        ),
    ),
}

SPLITS = ("train", "test", "validation", "train_without_validation")


def _is_positive_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and bool(x >= 1)


def _multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 [num_classes] multi-hot of a (possibly empty, possibly repeating) id sequence."""
    # Sum rather than reduce_max: the max over an empty axis is -inf, the sum is 0.
    counts = tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.float32), axis=0)
    return tf.minimum(counts, 1.0)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _missing_sources(builder, spec: TfdsMultilabel, download_dir: Path) -> list:
    """The `UrlInfo` and url of each source archive in neither the manual dir nor tfds's cache."""
    by_filename = {info.filename: (url, info) for url, info in builder.url_infos.items()}
    missing = []
    for filename in spec.source_files:
        url, info = by_filename[filename]
        # Where tfds's DownloadManager caches a finished download (with and without the
        # dataset-name folder of older tfds versions), or a file the user put by hand.
        cached = [
            folder / tfds_resource.get_dl_fname(url, info.checksum)
            for folder in (download_dir / builder.name, download_dir)
        ]
        manual = download_dir / "manual" / filename
        if not manual.exists() and not any(map(tfds_resource.is_locally_cached, cached)):
            missing.append((url, info))
    return missing


def _unreachable(url: str) -> str:
    """Why `url`'s host cannot be reached in one quick try; "" when it can."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"{parts.hostname}:{port}: {error}"
    return ""


def check_sources_reachable(name: str, data_dir: str | None) -> None:
    """Raises at once, saying which files to download and where, if tfds could not build `name`.

    tfds retries an unreachable host for minutes before failing with a bare connection error.
    Nothing is checked when the dataset is already prepared in `data_dir`, or when every
    archive it still needs is on disk or its host answers.
    """
    spec = TFDS_MULTILABEL[name]
    with no_stray_tfds_temp_dirs():
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return
    download_dir = Path(builder.data_dir_root) / "downloads"
    missing = _missing_sources(builder, spec, download_dir)
    reasons = {reason for url, _ in missing if (reason := _unreachable(url))}
    if not reasons:
        return
    files = "\n".join(f"  {url}  ({info.size / 1e9:.2f} GB)" for url, info in missing)
    raise FileNotFoundError(
        f"{name}: tfds `{spec.tfds_name}` is not prepared in {builder.data_dir_root} and its "
        f"sources cannot be downloaded here ({'; '.join(sorted(reasons))}). On a machine with "
        f"network, download\n{files}\nand put them in {download_dir / 'manual'} (tfds's "
        "manual dir; it checks their sha256), or prepare the dataset elsewhere and copy its "
        "tfds data dir. Set config.dataset.data_dir (or $TFDS_DATA_DIR) to use another "
        "data dir."
    )


def load_tfds_multilabel(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """Loads a split as {"inputs": uint8 [N, S, S, 3], "labels": float32 [N, C] multi-hot}.

    Downloads and prepares the tfds dataset into `data_dir` if needed; without network,
    `check_sources_reachable` says at once what to download. Examples come in tfds file order
    (no shuffling); `max_examples` keeps the first ones.
    """
    spec, tfds_split = _spec_and_split(name, split, image_size)
    if max_examples is not None and not _is_positive_int(max_examples):
        raise ValueError(f"`max_examples`: got {max_examples!r}, expected None or an int >= 1.")
    check_sources_reachable(name, data_dir)
    with no_stray_tfds_temp_dirs():
        ds = tfds.load(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=True)
    if max_examples is not None:
        ds = ds.take(max_examples)

    def convert(example):
        labels = example
        for key in spec.label_key:
            labels = labels[key]
        return {
            "inputs": _resize(example["image"], image_size),
            "labels": _multi_hot(labels, spec.num_classes),
        }

    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(_BATCH_SIZE)
    batches = list(tfds.as_numpy(ds))
    if not batches:
        return {
            "inputs": np.zeros((0, image_size, image_size, 3), np.uint8),
            "labels": np.zeros((0, spec.num_classes), np.float32),
        }
    return {key: np.concatenate([b[key] for b in batches]) for key in ("inputs", "labels")}


def _spec_and_split(name: str, split: str, image_size) -> tuple[TfdsMultilabel, str]:
    if name not in TFDS_MULTILABEL:
        raise ValueError(f"`name`: got {name!r}, expected one of {sorted(TFDS_MULTILABEL)}.")
    if split not in SPLITS:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(SPLITS)}.")
    if not _is_positive_int(image_size):
        raise ValueError(f"`image_size`: got {image_size!r}, expected an int >= 1.")
    spec = TFDS_MULTILABEL[name]
    return spec, getattr(spec, f"{split}_split")


def streamed_split(name: str, split: str, *, data_dir: str | None, image_size: int) -> dict:
    """A split as {"inputs": `StreamedInputs` of uint8 [S, S, 3], "labels": float32 [N, C]}.

    Prepares the tfds dataset as array_record in `data_dir` if needed (see
    `check_sources_reachable` when offline). The labels are read once, without decoding the
    images; an image is decoded and resized (as in `load_tfds_multilabel`) when it is indexed.
    """
    import grain

    spec, tfds_split = _spec_and_split(name, split, image_size)
    check_sources_reachable(name, data_dir)

    def data_source(**kwargs):
        with no_stray_tfds_temp_dirs():
            return tfds.data_source(
                spec.tfds_name,
                split=tfds_split,
                data_dir=data_dir,
                builder_kwargs={"file_format": "array_record"},
                **kwargs,
            )

    def labels_of(example) -> np.ndarray:
        for key in spec.label_key:
            example = example[key]
        return _multi_hot(np.asarray(example, np.int64), spec.num_classes).numpy()

    undecoded = data_source(decoders={"image": tfds.decode.SkipDecoding()})
    labels = np.zeros((len(undecoded), spec.num_classes), np.float32)
    for i in range(len(undecoded)):
        labels[i] = labels_of(undecoded[i])
    images = grain.MapDataset.source(data_source()).map(
        lambda example: _resize(example["image"], image_size).numpy()
    )
    return {"inputs": StreamedInputs(images), "labels": labels}
