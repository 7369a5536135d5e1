"""Training batches: which examples each host reads at each step, served through grain.

`HostBatches` serves training batches through grain: the order of batches is a pure function of
(seed, step) (`batch_indices`), which makes a resumed run see exactly the data an uninterrupted
run would, and each host reads only its own slice of every global batch. Its iterator state is
the step, which every checkpoint already holds. The splits it batches come from the dataset
registry (`sdjax.datasets`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from sdjax import datasets
from sdjax.modalities import Modality


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
      split: {"inputs", "labels"}, e.g. from `sdjax.datasets.load_splits`.
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


def training_batches(config: ml_collections.ConfigDict, train: dict[str, Any]) -> HostBatches:
    """The `HostBatches` of stage 1 for `config`, on this process; streamed data reads ahead."""
    dataset = datasets.DATASETS[config.dataset.name]
    return HostBatches(
        train,
        dataset.modality,
        global_batch_size=config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        prefetch=STREAM_PREFETCH if dataset.streamed else 0,
    )
