"""The VOC 2007 / COCO 2017 multi-label loaders, run offline on tfds mock data.

`tfds.testing.mock_data` builds random examples from the real builders' feature specs (no
dataset_info.json is shipped, so the default AUTO policy falls back to USE_CODE). It is
deterministic and gives every split the same examples, so the split mapping is checked by
recording what reaches `tfds.load`.
"""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.testing.mocking import RandomFakeGenerator

from sdjax import config_lib, datasets, train
from sdjax.datasets import tfds_multilabel
from sdjax.datasets.local_source import no_stray_tfds_temp_dirs

NUM_EXAMPLES = 6
IMAGE_SIZE = 32

# Written out here rather than read from TFDS_MULTILABEL, so the tests check the module's table.
EXPECTED = {
    "voc2007": (
        "voc/2007",
        {
            "train": "train+validation",
            "test": "test",
            "validation": "validation",
            "train_without_validation": "train",
        },
        ("labels",),
        20,
    ),
    "coco2017": (
        "coco/2017",
        {
            "train": "train",
            "test": "validation",
            "validation": "train[:5000]",
            "train_without_validation": "train[5000:]",
        },
        ("objects", "label"),
        80,
    ),
}


def _raw_examples(tfds_name, tfds_split):
    """The examples tfds itself yields (call inside the mock_data context)."""
    with no_stray_tfds_temp_dirs():
        ds = tfds.load(tfds_name, split=tfds_split, data_dir="/unused")
    return list(tfds.as_numpy(ds))


def _get(example, key_path):
    for key in key_path:
        example = example[key]
    return example


def _expected_multi_hot(ids_per_example, num_classes):
    rows = np.zeros((len(ids_per_example), num_classes), np.float32)
    for row, ids in zip(rows, ids_per_example, strict=True):
        row[np.asarray(ids, np.int64)] = 1.0
    return rows


@pytest.fixture(autouse=True)
def network_up(monkeypatch):
    """mock_data stands in for the download, so the offline check must not stop it here.

    That check, with the network down, is tested in test_faults.py.
    """
    monkeypatch.setattr(tfds_multilabel, "_unreachable", lambda url: "")


@pytest.fixture
def recorded_loads(monkeypatch):
    """Records the (name, split, data_dir) of every tfds.load call made by the module."""
    calls = []
    real_load = tfds.load

    def load(name, **kwargs):
        calls.append((name, kwargs["split"], kwargs["data_dir"]))
        return real_load(name, **kwargs)

    monkeypatch.setattr(tfds_multilabel.tfds, "load", load)
    return calls


@pytest.mark.parametrize("split", ["train", "test", "validation", "train_without_validation"])
@pytest.mark.parametrize("name", ["voc2007", "coco2017"])
def test_arrays_match_the_raw_tfds_examples(name, split, recorded_loads):
    tfds_name, splits, label_key, num_classes = EXPECTED[name]
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        out = tfds_multilabel.load_tfds_multilabel(
            name, split, data_dir="/some/dir", image_size=IMAGE_SIZE
        )
        assert recorded_loads == [(tfds_name, splits[split], "/some/dir")]
        raw = _raw_examples(tfds_name, splits[split])

    assert set(out) == {"inputs", "labels"}
    assert out["inputs"].shape == (NUM_EXAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out["inputs"].dtype == np.uint8
    assert out["labels"].shape == (NUM_EXAMPLES, num_classes)
    assert out["labels"].dtype == np.float32
    assert set(np.unique(out["labels"])) <= {0.0, 1.0}

    assert len(raw) == NUM_EXAMPLES
    ids = [_get(ex, label_key) for ex in raw]
    # Mock label sequences repeat ids and are 5..49 long; the row must be their set, once each.
    assert any(len(set(x.tolist())) < len(x) for x in ids)
    np.testing.assert_array_equal(out["labels"], _expected_multi_hot(ids, num_classes))
    for row, x in zip(out["labels"], ids, strict=True):
        assert row.sum() == len(set(x.tolist()))

    # The raw images are random noise of random size; a plain resize keeps each one's mean
    # colour, which also pins the row order to the raw example order.
    for image, ex in zip(out["inputs"], raw, strict=True):
        assert ex["image"].shape != (IMAGE_SIZE, IMAGE_SIZE, 3)
        np.testing.assert_allclose(
            image.reshape(-1, 3).mean(0), ex["image"].reshape(-1, 3).mean(0), atol=1.0
        )


def test_max_examples_keeps_the_first_examples():
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        full = tfds_multilabel.load_tfds_multilabel(
            "coco2017", "train", data_dir=None, image_size=IMAGE_SIZE
        )
        head = tfds_multilabel.load_tfds_multilabel(
            "coco2017", "train", data_dir=None, image_size=IMAGE_SIZE, max_examples=2
        )
    assert head["inputs"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(head["inputs"], full["inputs"][:2])
    np.testing.assert_array_equal(head["labels"], full["labels"][:2])


def _coco_with_empty_images(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Mock COCO examples where every other image has no objects (as ~1% of real COCO has)."""
    del split, decoders, read_config, shuffle_files
    features = self.info.features

    def examples():
        for i, ex in enumerate(RandomFakeGenerator(features, num_examples=4)):
            if i % 2 == 0:
                ex["objects"] = {k: v[:0] for k, v in ex["objects"].items()}
            yield ex

    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec(t.shape, t.tf_dtype), features.get_tensor_info()
    )
    return tf.data.Dataset.from_generator(examples, output_signature=signature)


def test_image_without_objects_gives_an_all_zero_row():
    with tfds.testing.mock_data(as_dataset_fn=_coco_with_empty_images):
        out = tfds_multilabel.load_tfds_multilabel("coco2017", "test", data_dir=None, image_size=8)
        raw = _raw_examples("coco/2017", "validation")
    assert [len(ex["objects"]["label"]) == 0 for ex in raw] == [True, False, True, False]
    assert out["labels"].shape == (4, 80)
    ids = [ex["objects"]["label"] for ex in raw]
    np.testing.assert_array_equal(out["labels"], _expected_multi_hot(ids, 80))
    assert out["labels"][0].sum() == 0 and out["labels"][1].sum() > 0


def test_multi_hot_of_empty_and_repeated_ids():
    empty = tfds_multilabel._multi_hot(tf.zeros([0], tf.int64), 5).numpy()
    np.testing.assert_array_equal(empty, np.zeros(5, np.float32))
    repeated = tfds_multilabel._multi_hot(tf.constant([3, 0, 3, 3], tf.int64), 5).numpy()
    np.testing.assert_array_equal(repeated, [1, 0, 0, 1, 0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "foo"}, "`name`: got 'foo', expected one of ['coco2017', 'voc2007']."),
        ({"name": "voc/2007"}, "`name`: got 'voc/2007', expected one of ['coco2017', 'voc2007']."),
        (
            {"split": "val"},
            "`split`: got 'val', expected one of "
            "['train', 'test', 'validation', 'train_without_validation'].",
        ),
        ({"image_size": 0}, "`image_size`: got 0, expected an int >= 1."),
        ({"image_size": 32.0}, "`image_size`: got 32.0, expected an int >= 1."),
        ({"max_examples": 0}, "`max_examples`: got 0, expected None or an int >= 1."),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    args = {"name": "voc2007", "split": "train", "image_size": IMAGE_SIZE, **kwargs}
    name, split = args.pop("name"), args.pop("split")
    # Raised before tfds is touched: no mock needed, nothing is downloaded.
    with pytest.raises(ValueError, match=re.escape(message)):
        tfds_multilabel.load_tfds_multilabel(name, split, data_dir="/nonexistent", **args)


def test_table():
    table = tfds_multilabel.TFDS_MULTILABEL
    assert sorted(table) == ["coco2017", "voc2007"]
    for name, (tfds_name, splits, label_key, num_classes) in EXPECTED.items():
        spec = table[name]
        assert (spec.tfds_name, spec.num_classes, spec.label_key) == (
            tfds_name,
            num_classes,
            label_key,
        )
        assert {split: getattr(spec, f"{split}_split") for split in splits} == splits


def _consistent_voc_source(builder, split, decoders=None, num_examples=5, **kwargs):
    """Mock VOC examples whose `objects` sequences agree in length (tfds's mock draws each
    sub-feature's length on its own, which its data-source mock then fails to encode)."""
    del split, decoders, kwargs
    examples = list(RandomFakeGenerator(builder.info.features, num_examples=num_examples))
    for example in examples:
        count = min(len(v) for v in example["objects"].values())
        example["objects"] = {k: v[:count] for k, v in example["objects"].items()}
    return examples


def test_voc_streamed_split_resizes_and_multi_hots_each_example():
    with tfds.testing.mock_data(as_data_source_fn=_consistent_voc_source):
        split = tfds_multilabel.streamed_split("voc2007", "test", data_dir=None, image_size=16)
    with no_stray_tfds_temp_dirs():
        raw = _consistent_voc_source(tfds.builder("voc/2007"), "test")
    assert split["inputs"].shape == (5, 16, 16, 3) and split["inputs"].dtype == np.uint8
    expected_labels = np.zeros((5, 20), np.float32)
    for row, example in zip(expected_labels, raw, strict=True):
        row[np.asarray(example["labels"], np.int64)] = 1.0
    np.testing.assert_array_equal(split["labels"], expected_labels)
    for i in (4, 0):
        resized = tf.image.resize(raw[i]["image"], (16, 16), antialias=True)
        expected = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(split["inputs"][np.array([i])][0], expected)


@pytest.mark.slow
def test_voc_config_trains_end_to_end_on_mock_data(tmp_path):
    config = config_lib.load_config_file("voc2007", "tiny")
    config.dataset.data_dir = str(tmp_path)

    def data_source(builder, split, **kwargs):  # a function: mock_data binds it to the builder
        return _consistent_voc_source(builder, split, num_examples=128, **kwargs)

    with tfds.testing.mock_data(as_data_source_fn=data_source):
        loaded = datasets.load_split("voc2007", "test", data_dir=str(tmp_path), image_size=32)
        results = train.train_and_evaluate(config, tmp_path / "run")
    assert loaded["inputs"].shape == (128, 32, 32, 3) and loaded["labels"].shape == (128, 20)
    assert np.isfinite(results["final_train_loss"])
    assert results["linear_eval"]["num_scored_classes"] > 0
    coco = config_lib.load_config_file("coco2017")
    # The GPU/TPU settings are a valid config.
    config_lib.check_config(coco, num_devices=8, num_processes=1)
    assert (coco.dataset.name, coco.model.encoder.in_channels) == ("coco2017", 3)
    assert (coco.model.encoder.block, coco.model.encoder.stage_sizes) == (
        "bottleneck",
        (3, 4, 6, 3),
    )
