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
"train" / "validation" (the COCO 2017 test split has no labels).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

_BATCH_SIZE = 256


@dataclasses.dataclass(frozen=True)
class TfdsMultilabel:
    """Where a multi-label dataset lives in tfds and how to read its labels."""

    tfds_name: str
    num_classes: int
    train_split: str
    test_split: str
    label_key: tuple[str, ...]  # Path to the int class-id sequence in a tfds example.


TFDS_MULTILABEL = {
    "voc2007": TfdsMultilabel(
        tfds_name="voc/2007",
        num_classes=20,
        train_split="train+validation",
        test_split="test",
        label_key=("labels",),
    ),
    "coco2017": TfdsMultilabel(
        tfds_name="coco/2017",
        num_classes=80,
        train_split="train",
        test_split="validation",
        label_key=("objects", "label"),
    ),
}

SPLITS = ("train", "test")


def _is_positive_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 1


def _multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """float32 [num_classes] multi-hot of a (possibly empty, possibly repeating) id sequence."""
    # Sum rather than reduce_max: the max over an empty axis is -inf, the sum is 0.
    counts = tf.reduce_sum(tf.one_hot(labels, num_classes, dtype=tf.float32), axis=0)
    return tf.minimum(counts, 1.0)


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def load_tfds_multilabel(
    name: str,
    split: str,
    *,
    data_dir: str | None,
    image_size: int,
    max_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """Loads a split as {"inputs": uint8 [N, S, S, 3], "labels": float32 [N, C] multi-hot}.

    Downloads and prepares the tfds dataset into `data_dir` if needed. Examples come in tfds file
    order (no shuffling); `max_examples` keeps the first ones.
    """
    if name not in TFDS_MULTILABEL:
        raise ValueError(f"`name`: got {name!r}, expected one of {sorted(TFDS_MULTILABEL)}.")
    if split not in SPLITS:
        raise ValueError(f"`split`: got {split!r}, expected one of {list(SPLITS)}.")
    if not _is_positive_int(image_size):
        raise ValueError(f"`image_size`: got {image_size!r}, expected an int >= 1.")
    if max_examples is not None and not _is_positive_int(max_examples):
        raise ValueError(f"`max_examples`: got {max_examples!r}, expected None or an int >= 1.")

    spec = TFDS_MULTILABEL[name]
    tfds_split = spec.train_split if split == "train" else spec.test_split
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
