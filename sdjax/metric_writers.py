"""Metric writers that need no TensorFlow: TensorBoard event files and the log.

clu's writers import TensorFlow. These write the same TensorBoard event files through
tensorboardX, so `tensorboard --logdir WORKDIR` shows a run's scalars and hyperparameters, and a
trainer installed without TensorFlow (the `train` extra) logs like one installed with it.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from absl import logging


class MetricWriter:
    """What the trainer and the evaluators write to: scalars at a step, and the hparams once."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def write_hparams(self, hparams: Mapping[str, object]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir`: scalars, and hparams for TensorBoard's HPARAMS tab."""

    def __init__(self, logdir: str | Path):
        import tensorboardX  # the `train` extra; imported here so the rest loads without it

        self._writer = tensorboardX.SummaryWriter(str(logdir))

    def write_scalars(self, step, scalars):
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), global_step=int(step))

    def write_hparams(self, hparams):
        from tensorboardX.summary import hparams as hparams_summaries

        # TensorBoard takes numbers, strings and booleans; a tuple (stage sizes) is shown as text.
        values = {
            name: value if isinstance(value, (bool, numbers.Number, str)) else str(value)
            for name, value in hparams.items()
        }
        for summary in hparams_summaries(values, {}):  # in the run's own folder, as clu does
            self._writer.file_writer.add_summary(summary)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class LoggingWriter(MetricWriter):
    """Scalars as log lines: `[step] name=value, ...`."""

    def write_scalars(self, step, scalars):
        values = ", ".join(f"{name}={float(value):.6g}" for name, value in sorted(scalars.items()))
        logging.info("[%d] %s", step, values)

    def write_hparams(self, hparams):
        logging.info("[hparams] %s", ", ".join(f"{k}={v}" for k, v in sorted(hparams.items())))


class MultiWriter(MetricWriter):
    """Writes everything to each of `writers`."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = list(writers)

    def write_scalars(self, step, scalars):
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for writer in self._writers:
            writer.write_hparams(hparams)

    def flush(self):
        for writer in self._writers:
            writer.flush()

    def close(self):
        for writer in self._writers:
            writer.close()


def create_default_writer(logdir: str | Path | None, *, just_logging: bool = False) -> MultiWriter:
    """The log, plus TensorBoard event files in `logdir` unless it is None or `just_logging`
    (non-chief hosts)."""
    writers: list[MetricWriter] = [LoggingWriter()]
    if logdir is not None and not just_logging:
        writers.append(TensorBoardWriter(logdir))
    return MultiWriter(writers)


class ReportProgress:
    """Called after every step; every `every_secs` logs steps/s, progress and the time left, and
    writes `steps_per_sec`."""

    def __init__(self, *, num_train_steps: int, writer: MetricWriter, every_secs: float = 30.0):
        self._num_train_steps = num_train_steps
        self._writer = writer
        self._every_secs = every_secs
        self._last_time: float | None = None  # None until the first step
        self._last_step = 0

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self._last_time is None:  # the first step includes compilation: time from here
            self._last_time, self._last_step = now, step
            return
        if now - self._last_time < self._every_secs:
            return
        steps_per_sec = (step - self._last_step) / (now - self._last_time)
        left_min = (self._num_train_steps - step) / steps_per_sec / 60
        logging.info(
            "%.2f steps/s, %.1f%% (%d/%d), ETA %.1f min",
            steps_per_sec,
            100 * step / self._num_train_steps,
            step,
            self._num_train_steps,
            left_min,
        )
        self._writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
        self._last_time, self._last_step = now, step
