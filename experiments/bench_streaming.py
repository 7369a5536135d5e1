"""Benchmark: per-host memory while training batches stream from array_record through grain.

Builds a mock COCO-like dataset (`--num_examples` JPEG images with 80-class label sets, written
as array_record by a tfds builder), opens it with `tfds_multilabel.streamed_split` (the VOC/COCO
path) and reads `--steps` batches of host 0 of 2 with `HostBatches`, as stage 1 does. The
process's RSS is sampled before, after opening, and after every step; it must stay flat while
the in-memory alternative grows with the dataset. Writes experiments/results/bench_streaming.md.

COMMAND (from the repository root):
  .venv/bin/python -m experiments.bench_streaming [--num_examples=50000] [--steps=200]
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tensorflow_datasets as tfds
from absl import app, flags

from experiments.suite import cpu_model
from sdjax import input_pipeline, modalities
from sdjax.datasets import tfds_multilabel

flags.DEFINE_integer("num_examples", 50_000, "mock examples in the training split")
flags.DEFINE_integer("steps", 200, "training steps read")
flags.DEFINE_integer("global_batch_size", 256, "global batch; host 0 of 2 reads half")
flags.DEFINE_integer("image_size", 224, "the side images are resized to, as for COCO")
FLAGS = flags.FLAGS

RESULTS = Path(__file__).parent / "results" / "bench_streaming.md"
RSS_TARGET_MB = 2048  # issue 14: per-host RSS beyond the model's own memory
SOURCE_SIDE = 160  # stored JPEG side: smooth synthetic images, a few KB each
NUM_CLASSES = 80


class BenchCocoMock(tfds.core.GeneratorBasedBuilder):
    """Synthetic COCO-like examples: a smooth JPEG image and a set of 1-4 of 80 classes."""

    VERSION = tfds.core.Version("1.0.0")
    num_examples = 0

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "labels": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=80)),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        ramp = np.linspace(0, 1, SOURCE_SIDE, dtype=np.float32)
        for i in range(self.num_examples):
            colour = rng.uniform(0, 255, 3).astype(np.float32)
            image = (ramp[:, None, None] * colour + ramp[None, :, None] * (255 - colour)) / 2
            labels = rng.choice(NUM_CLASSES, rng.integers(1, 5), replace=False)
            yield i, {"image": image.astype(np.uint8), "labels": labels}


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main(argv):
    del argv
    data_dir = tempfile.mkdtemp(prefix="bench_streaming_")
    try:
        measure(data_dir)
    finally:
        shutil.rmtree(data_dir)


def measure(data_dir: str) -> None:
    """Builds the mock data in `data_dir`, reads batches, writes the results table."""
    BenchCocoMock.num_examples = FLAGS.num_examples
    build_start = time.time()
    tfds.builder(
        "bench_coco_mock", data_dir=data_dir, file_format="array_record"
    ).download_and_prepare()
    build_seconds = time.time() - build_start
    tfds_multilabel.TFDS_MULTILABEL["bench_coco_mock"] = tfds_multilabel.TfdsMultilabel(
        "bench_coco_mock", NUM_CLASSES, "train", "train", ("labels",), ()
    )
    rss = {"before opening": rss_mb()}
    open_start = time.time()
    train = tfds_multilabel.streamed_split(
        "bench_coco_mock", "train", data_dir=data_dir, image_size=FLAGS.image_size
    )
    open_seconds = time.time() - open_start
    rss["after opening (labels read)"] = rss_mb()
    batches = input_pipeline.HostBatches(
        train,
        modalities.IMAGE,
        global_batch_size=FLAGS.global_batch_size,
        seed=0,
        process_index=0,
        process_count=2,
        prefetch=input_pipeline.STREAM_PREFETCH,
    )
    samples = []
    read_start = time.time()
    for step in range(FLAGS.steps):
        batch = batches.host_batch(step)
        assert batch["inputs"].shape[1:] == (FLAGS.image_size, FLAGS.image_size, 3)
        samples.append(rss_mb())
    read_seconds = time.time() - read_start
    rss["after the first 10 steps"] = samples[min(9, len(samples) - 1)]
    rss[f"peak over {FLAGS.steps} steps"] = max(samples)
    rss[f"after step {FLAGS.steps}"] = samples[-1]
    host_batch_mb = batch["inputs"].nbytes / 2**20
    in_memory_mb = FLAGS.num_examples * FLAGS.image_size**2 * 3 / 2**20
    growth = max(samples) - rss["after opening (labels read)"]
    lines = [
        "# Streaming input: per-host memory",
        "",
        f"{datetime.date.today()}, `python -m experiments.bench_streaming "
        f"--num_examples={FLAGS.num_examples} --steps={FLAGS.steps}`. Mock COCO-like data: "
        f"{FLAGS.num_examples} JPEG images ({SOURCE_SIDE}x{SOURCE_SIDE}) with 80-class label sets "
        f"in array_record, resized to {FLAGS.image_size}; global batch {FLAGS.global_batch_size}, "
        f"host 0 of 2 ({FLAGS.global_batch_size // 2} examples a step), "
        f"{input_pipeline.STREAM_PREFETCH} steps read ahead. RSS of the process (no model).",
        "",
        "| point | RSS (MiB) |",
        "|---|---|",
        *[f"| {point} | {value:.0f} |" for point, value in rss.items()],
        "",
        f"- Growth while reading {FLAGS.steps} steps "
        f"({FLAGS.steps * FLAGS.global_batch_size // 2} examples): {growth:.0f} MiB; one host "
        f"batch of float32 inputs is {host_batch_mb:.0f} MiB.",
        f"- Holding the split's uint8 images in memory instead would take {in_memory_mb:.0f} MiB "
        "on every host.",
        f"- Build {build_seconds:.0f} s; opening (one pass over the labels, images not decoded) "
        f"{open_seconds:.1f} s; reading {read_seconds / FLAGS.steps * 1000:.0f} ms a step on "
        f"{psutil.cpu_count()} CPU cores ({cpu_model()}).",
        "",
        f"Target: peak RSS {max(samples):.0f} MiB <= {RSS_TARGET_MB} MiB: "
        f"{'PASS' if max(samples) <= RSS_TARGET_MB else 'FAIL'}",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
