"""The MNIST-mosaic data, its tfds builder, the (seed, step) sampler and the augmentations."""

import jax
import numpy as np
import pytest

from sdjax import datasets, input_pipeline, modalities
from sdjax.datasets import mnist_mosaic


def test_mosaics_have_the_documented_shapes_and_label_sets():
    mosaics = mnist_mosaic.make_mnist_mosaic("train", num_examples=200, seed=0)
    assert mosaics["image"].shape == (200, 56, 56, 1) and mosaics["image"].dtype == np.uint8
    assert mosaics["labels"].shape == (200, 10) and mosaics["labels"].dtype == np.float32
    sizes = mosaics["labels"].sum(axis=1)
    assert set(np.unique(sizes)) == {1.0, 2.0, 3.0, 4.0}
    digits, classes = mnist_mosaic.load_source_digits()
    assert digits.shape == (5000, 28, 28) and np.bincount(classes).tolist() == [500] * 10
    for i in range(200):
        # The label set is exactly the classes of the four cells, and each cell is its digit.
        cell_classes = classes[mosaics["source_index"][i]]
        assert set(np.flatnonzero(mosaics["labels"][i])) == set(cell_classes)
        image = mosaics["image"][i, :, :, 0]
        cells = [image[:28, :28], image[:28, 28:], image[28:, :28], image[28:, 28:]]
        for cell, source in zip(cells, mosaics["source_index"][i], strict=True):
            np.testing.assert_array_equal(cell, digits[source])


def test_train_and_test_use_disjoint_source_digits():
    _, classes = mnist_mosaic.load_source_digits()
    train_pool = mnist_mosaic.source_indices(classes, "train", seed=0)
    test_pool = mnist_mosaic.source_indices(classes, "test", seed=0)
    assert not set(train_pool) & set(test_pool)
    assert len(train_pool) == 4000 and len(test_pool) == 1000
    train = mnist_mosaic.make_mnist_mosaic("train", num_examples=300, seed=0)
    test = mnist_mosaic.make_mnist_mosaic("test", num_examples=300, seed=0)
    assert set(train["source_index"].ravel()) <= set(train_pool)
    assert set(test["source_index"].ravel()) <= set(test_pool)


def test_generation_is_deterministic_in_the_seed():
    first = mnist_mosaic.make_mnist_mosaic("test", num_examples=50, seed=3)
    again = mnist_mosaic.make_mnist_mosaic("test", num_examples=50, seed=3)
    other = mnist_mosaic.make_mnist_mosaic("test", num_examples=50, seed=4)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["labels"], again["labels"])
    assert not np.array_equal(first["image"], other["image"])


def test_tfds_builder_serves_the_generated_arrays(tmp_path):
    loaded = datasets.load_split("mnist_mosaic_tiny", "test", data_dir=str(tmp_path))
    made = mnist_mosaic.make_mnist_mosaic("test", num_examples=256, seed=0)
    np.testing.assert_array_equal(loaded["inputs"], made["image"])
    np.testing.assert_array_equal(loaded["labels"], made["labels"])
    with pytest.raises(ValueError, match="`name`: got 'mnist'"):
        datasets.load_split("mnist", "train", data_dir=str(tmp_path))


def test_batch_order_is_a_pure_function_of_seed_and_step():
    kwargs = dict(global_batch_size=8, seed=1)
    first = [input_pipeline.batch_indices(100, step=s, **kwargs) for s in range(12)]
    again = [input_pipeline.batch_indices(100, step=s, **kwargs) for s in range(12)]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    epoch = np.concatenate(first[:12])  # 12 steps of 8 = one epoch of 100, remainder dropped
    assert len(set(epoch.tolist())) == 96
    next_epoch = input_pipeline.batch_indices(100, step=12, **kwargs)
    assert not np.array_equal(next_epoch, first[0])


def test_host_shards_partition_the_global_batch():
    global_batch = input_pipeline.batch_indices(64, global_batch_size=16, seed=0, step=5)
    shards = [
        input_pipeline.batch_indices(
            64, global_batch_size=16, seed=0, step=5, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), global_batch)
    with pytest.raises(ValueError, match="`process_count`: got 3"):
        input_pipeline.batch_indices(64, global_batch_size=16, seed=0, step=0, process_count=3)
    with pytest.raises(ValueError, match="`global_batch_size`: got 65"):
        input_pipeline.batch_indices(64, global_batch_size=65, seed=0, step=0)


def test_augmented_views_are_deterministic_shifted_copies():
    images = modalities.to_float(
        mnist_mosaic.make_mnist_mosaic("train", num_examples=6, seed=0)["image"]
    )
    views = modalities.augment_views(jax.random.key(0), images, num_views=2)
    again = modalities.augment_views(jax.random.key(0), images, num_views=2)
    assert views.shape == (6, 2, 56, 56, 1)
    np.testing.assert_array_equal(views, again)
    assert float(views.min()) >= 0 and float(views.max()) <= 1
    assert not np.allclose(views[:, 0], views[:, 1])
    # Each view is the image moved by at most 4 pixels: the ink is conserved up to the jitter.
    ink = images.sum(axis=(1, 2, 3))
    view_ink = np.asarray(views).sum(axis=(2, 3, 4))
    assert np.all(view_ink > 0.4 * ink[:, None]) and np.all(view_ink < 2.0 * ink[:, None] + 500)


def test_validation_mosaics_use_their_own_source_digits_and_leave_test_as_it_was(tmp_path):
    _, classes = mnist_mosaic.load_source_digits()
    pools = {
        split: set(mnist_mosaic.source_indices(classes, split, seed=0, with_validation=True))
        for split in ("train", "validation", "test")
    }
    assert (len(pools["train"]), len(pools["validation"]), len(pools["test"])) == (3400, 600, 1000)
    assert not pools["train"] & pools["validation"] and not pools["train"] & pools["test"]
    assert not pools["validation"] & pools["test"]
    # Together, train and validation are the training digits of the dataset without validation.
    assert pools["train"] | pools["validation"] == set(
        mnist_mosaic.source_indices(classes, "train", seed=0)
    )
    for split, pool in pools.items():
        made = mnist_mosaic.make_mnist_mosaic(split, num_examples=100, seed=0, with_validation=True)
        assert set(made["source_index"].ravel()) <= pool, split
    # Through the input pipeline: the validation builder's splits, and test unchanged.
    loaded = {
        split: datasets.load_split("mnist_mosaic_tiny", split, data_dir=str(tmp_path))
        for split in ("validation", "train_without_validation", "test")
    }
    for split, stored in (("validation", "validation"), ("train_without_validation", "train")):
        made = mnist_mosaic.make_mnist_mosaic(
            stored, num_examples=256, seed=0, with_validation=True
        )
        np.testing.assert_array_equal(loaded[split]["inputs"], made["image"])
    plain_test = mnist_mosaic.make_mnist_mosaic("test", num_examples=256, seed=0)
    np.testing.assert_array_equal(loaded["test"]["inputs"], plain_test["image"])
    with pytest.raises(ValueError, match="`split`: got 'validation', expected one of"):
        mnist_mosaic.source_indices(classes, "validation", seed=0)
    with pytest.raises(ValueError, match="`split`: got 'val', expected one of"):
        datasets.load_split("mnist_mosaic_tiny", "val", data_dir=str(tmp_path))
