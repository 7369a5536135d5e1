"""Streaming: batches read from array_record through grain equal the in-memory batches.

The in-memory reference is the gathering the trainer did before `HostBatches` existed:
`to_float(inputs[batch_indices(...)])`, on arrays read whole into memory.
"""

import grain
import numpy as np
import pytest

from sdjax import datasets, input_pipeline, modalities
from sdjax.datasets import sources

GLOBAL_BATCH = 24  # 256 tiny mosaics: 10 steps an epoch, so steps 0..12 cross an epoch


@pytest.fixture(scope="module")
def tiny_mosaics(tmp_path_factory):
    """(in-memory split, streamed split) of the tiny MNIST mosaics, from one array_record build."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    in_memory = datasets.load_split("mnist_mosaic_tiny", "train", data_dir=data_dir)
    source = sources.tfds_source("mnist_mosaic/tiny", "train", data_dir)
    examples = grain.MapDataset.source(source).map(lambda example: example["inputs"])
    streamed = {
        "inputs": datasets.StreamedInputs(examples),
        "labels": in_memory["labels"],
    }
    return in_memory, streamed


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("process_count", [1, 2])
def test_streamed_host_batches_equal_the_in_memory_gather(tiny_mosaics, process_count, prefetch):
    in_memory, streamed = tiny_mosaics
    for process_index in range(process_count):
        common = dict(global_batch_size=GLOBAL_BATCH, seed=3, process_count=process_count)
        batches = input_pipeline.HostBatches(
            streamed, modalities.IMAGE, process_index=process_index, prefetch=prefetch, **common
        )
        # In order, then a jump back (a resumed run) and forward.
        for step in [*range(13), 4, 5, 11]:
            indices = input_pipeline.batch_indices(
                256, step=step, process_index=process_index, **common
            )
            batch = batches.host_batch(step)
            assert batch["inputs"].dtype == np.float32
            np.testing.assert_array_equal(
                batch["inputs"], modalities.to_float(in_memory["inputs"][indices])
            )
            np.testing.assert_array_equal(batch["labels"], in_memory["labels"][indices])


def test_in_memory_host_batches_are_the_plain_gather(tiny_mosaics):
    in_memory, _ = tiny_mosaics
    batches = input_pipeline.HostBatches(
        in_memory, modalities.IMAGE, global_batch_size=32, seed=0, process_index=1, process_count=4
    )
    indices = input_pipeline.batch_indices(
        256, global_batch_size=32, seed=0, step=9, process_index=1, process_count=4
    )
    assert len(indices) == 8
    np.testing.assert_array_equal(
        batches.host_batch(9)["inputs"], modalities.to_float(in_memory["inputs"][indices])
    )


def test_streamed_inputs_read_only_what_is_indexed():
    reads = []

    def read(index):
        reads.append(index)
        return np.full((2, 3), index, np.uint8)

    inputs = datasets.StreamedInputs(grain.MapDataset.range(0, 10).map(read))
    assert (len(inputs), inputs.shape, inputs.dtype, inputs.ndim) == (10, (10, 2, 3), np.uint8, 3)
    reads.clear()
    np.testing.assert_array_equal(inputs[np.array([7, 2])][:, 0, 0], [7, 2])
    np.testing.assert_array_equal(inputs[8:][:, 0, 0], [8, 9])
    assert reads == [7, 2, 8, 9]
    first = inputs.first(4)
    assert first.shape == (4, 2, 3)
    np.testing.assert_array_equal(first[:][:, 0, 0], [0, 1, 2, 3])
    with pytest.raises(TypeError, match="`key`: got 3"):
        inputs[3]


def test_host_batches_check_their_arguments(tiny_mosaics):
    in_memory, _ = tiny_mosaics
    with pytest.raises(ValueError, match="`process_count`: got 5"):
        input_pipeline.HostBatches(
            in_memory, modalities.IMAGE, global_batch_size=32, seed=0, process_count=5
        )
