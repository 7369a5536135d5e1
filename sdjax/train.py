"""The trainer: contrastive pre-training (stage 1), then the evaluators on frozen features.

Stage 1 trains an encoder with a loss of the S-D family (`config.method = "contrastive"`), with
sigmoid BCE (`"bce"`, the supervised baseline), or with both (`"joint"`: a linear classifier's BCE
plus `loss.joint_weight` times the contrastive loss). The contrast set is the global batch
(`config.framework = "in_batch"`) or MoCo's keys and queue (`"moco"`, see `sdjax.objectives`).
Then `sdjax.evaluate` runs the evaluators (linear probe, held-out loss, test outputs, and the
joint classifier's own test metrics), which also run on any checkpoint on their own.

Data parallelism: a one-axis mesh over every device of every host. Batches are sharded along
it, parameters are replicated, and the loss gathers the contrast set across devices, so it is
the loss of the global batch; `jax.grad` is taken outside the loss's `shard_map`, which makes
the gradient exactly the single-device gradient of that global batch.

Determinism: the data order and the augmentations are pure functions of (seed, step) and the
model state (with MoCo's momentum encoder and queue) is checkpointed, so a run resumed from any
checkpoint ends with the same metrics as an uninterrupted one.
"""

import contextlib
import functools
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import ml_collections
from clu import metrics, parameter_overview
from flax import nnx

from sdjax import (
    checkpointing,
    config_lib,
    datasets,
    evaluate,
    gradient_cache,
    input_pipeline,
    metric_writers,
    objectives,
)
from sdjax.sharding import data_parallel_mesh, shard_host_batch

STOPPED_BEFORE_TRAINING = "SIGTERM before the first training step: stopped; rerun to resume."


class Preempted(Exception):
    """SIGTERM arrived; the state was saved (if training had begun) and the run can resume."""


class NonFiniteLoss(FloatingPointError):
    """The training loss or state became non-finite; nothing non-finite was checkpointed."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (its directory removed, a full disk, ...)."""


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    """What the training loop logs: the interval mean of the loss, and the learning rate."""

    # clu's idiom: the field's type is the metric class (a call that mypy cannot read as a type).
    loss: metrics.Average.from_output("loss")  # type: ignore[valid-type]
    learning_rate: metrics.LastValue.from_output("learning_rate")  # type: ignore[valid-type]


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Callable:
    """`step(model, optimizer, inputs, labels, step) -> TrainMetrics` on a sharded global batch.

    With `framework = "moco"` the step also takes the `MomentumEncoder` (last) and updates it in
    place, in MoCo's order: the EMA step, the keys of view 1, the loss of the queries (view 0)
    against those keys and the queue, the gradient step, then the keys and labels enqueued.
    """
    loss_fn = objectives.make_stage1_loss(config, mesh)  # the MoCo step uses it too
    schedule = objectives.learning_rate_schedule(config)
    chunk_size = config.embedding_chunk_size
    if chunk_size:
        flat_views, loss_of_outputs = objectives.make_stage1_parts(config, mesh)

        def value_and_grad(model, inputs, labels, step):
            return gradient_cache.chunked_value_and_grad(
                model,
                flat_views(inputs, step),
                functools.partial(loss_of_outputs, labels=labels),
                chunk_size,
            )
    else:

        def value_and_grad(model, inputs, labels, step):
            return nnx.value_and_grad(loss_fn)(model, inputs, labels, step)

    @functools.partial(nnx.jit, donate_argnums=(0, 1))  # model and optimiser update in place
    def train_step(model, optimizer, inputs, labels, step):
        loss, grads = value_and_grad(model, inputs, labels, step)
        optimizer.update(model, grads)
        return TrainMetrics.single_from_model_output(loss=loss, learning_rate=schedule(step))

    if config.framework != "moco":
        return train_step
    views_fn = objectives.make_views_fn(config)
    queue_sharding = objectives.queue_sharding(mesh)

    @nnx.jit
    def moco_train_step(model, optimizer, inputs, labels, step, momentum_encoder):
        momentum_encoder.follow(model, config.moco.momentum)
        keys = momentum_encoder(views_fn(inputs, step)[:, 1])
        contrast_set = momentum_encoder.contrast_set(keys, labels)
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, labels, step, contrast_set)
        optimizer.update(model, grads)
        momentum_encoder.enqueue(keys, labels, queue_sharding)
        return TrainMetrics.single_from_model_output(loss=loss, learning_rate=schedule(step))

    return moco_train_step


class _Sigterm:
    """SIGTERM before this process has taken a training step ends it at once: nothing unsaved
    would be lost, and set-up or the first compilation can take minutes. (It exits rather than
    raises: an exception thrown into arbitrary library code, an import say, can be swallowed.)
    Later, the loop saves at the end of the step and raises `Preempted`."""

    def __init__(self):
        self.requested = False
        self.stop_at_once = True

    def __call__(self, signum, frame):
        self.requested = True
        if self.stop_at_once:
            print(STOPPED_BEFORE_TRAINING, file=sys.stderr, flush=True)
            os._exit(0)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """Runs (or resumes) stage 1 in `workdir`, then the evaluators; returns the results dict.

    SIGTERM during set-up stops at once; during stage 1 it saves a checkpoint and raises
    `Preempted` (on every host of a multi-host run, at the same step, through orbax's
    preemption sync point); during evaluation, which takes seconds, the run finishes first.

    Raises:
      config_lib.ConfigError: a bad config, or a workdir that holds another config's run. One
        found only once the data loaded leaves the workdir as it was.
      checkpointing.WorkdirUnusable: another process is running in `workdir`
        (`WorkdirInUse`), or it cannot be written.
      datasets.DataUnavailable: the dataset's source files are missing.
      NonFiniteLoss: the loss or the state became non-finite (last good checkpoint kept).
      CheckpointWriteFailed: a checkpoint could not be written.
      Preempted: when SIGTERM arrived.
    """
    config_lib.check_config(
        config, num_devices=jax.device_count(), num_processes=jax.process_count()
    )
    workdir = Path(workdir)
    created = checkpointing.make_workdir(workdir)
    sigterm = _Sigterm()
    previous_handler = None
    if jax.process_count() == 1:  # several processes: jax's preemption notifier has SIGTERM
        previous_handler = signal.signal(signal.SIGTERM, sigterm)
    try:
        with checkpointing.WorkdirLock(workdir, created=created):
            return _train_and_evaluate(config, workdir, sigterm)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _train_and_evaluate(config, workdir: Path, sigterm: _Sigterm) -> dict:
    mesh = data_parallel_mesh()
    data = datasets.load_splits(config.dataset, datasets.run_splits(config))
    train = data["train"]
    config_lib.check_data_fits(config, train)
    num_classes = train["labels"].shape[1]
    model, optimizer, momentum_encoder = objectives.create_train_state(config, num_classes, mesh)
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), msg="Model parameters"
    )
    checkpoints, start_step, state, curve = checkpointing.restore_latest(
        workdir, config, objectives.checkpoint_state(model, optimizer, momentum_encoder)
    )
    objectives.restore_train_state(state, model, optimizer, momentum_encoder)

    is_chief = jax.process_index() == 0
    writer = metric_writers.MultiWriter(
        [
            metric_writers.create_default_writer(workdir, just_logging=not is_chief),
            metric_writers.CurveWriter(curve),
        ]
    )
    if start_step == 0:
        writer.write_hparams(config_lib.flat_fields(config))
    stage1_start = time.time()
    _train_stage1(
        config,
        mesh,
        train,
        (model, optimizer, momentum_encoder),
        checkpoints,
        writer,
        curve,
        sigterm,
    )
    stage1_seconds = time.time() - stage1_start

    results = {
        "config": config.to_dict(),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "resumed_from_step": start_step,
        "stage1_seconds": stage1_seconds,
        "final_train_loss": curve[-1]["train/loss"] if curve else None,
    }
    results |= evaluate.evaluate(config, model, data, mesh, workdir, writer)
    writer.close()
    if is_chief:
        evaluate.write_results(workdir, results)
        evaluate.plot_training_curve(config, curve, workdir / "training_curves.png")
    return results


def _train_stage1(config, mesh, train, train_state, checkpoints, writer, curve, sigterm):
    """Stage 1 from the last checkpoint's step: logs intervals, saves only finite states.

    `train_state` is (model, optimizer, momentum encoder or None), updated in place. `curve` is
    the list the writer appends logged scalars to; every checkpoint stores it.
    """
    model, optimizer, momentum_encoder = train_state
    moco_args = () if momentum_encoder is None else (momentum_encoder,)
    train_step = make_train_step(config, mesh)
    start_step = checkpoints.latest_step() or 0
    batches = input_pipeline.training_batches(config, train)
    report_progress = metric_writers.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer, every_secs=30
    )
    interval = TrainMetrics.empty()
    for step in range(start_step, config.num_train_steps):
        batch = batches.host_batch(step)
        interval = interval.merge(
            train_step(
                model,
                optimizer,
                shard_host_batch(batch["inputs"], mesh),
                shard_host_batch(batch["labels"], mesh),
                step,
                *moco_args,
            )
        )
        sigterm.stop_at_once = False
        done = step + 1
        report_progress(done)
        preempted = sigterm.requested or checkpoints.reached_preemption(done)
        last = done == config.num_train_steps
        if done % config.log_every_steps == 0 or last:
            logged = {f"train/{k}": float(v) for k, v in interval.compute().items()}
            _stop_unless_finite(logged["train/loss"], "training loss", done, checkpoints)
            writer.write_scalars(done, logged)
            interval = TrainMetrics.empty()
        if checkpoints.should_save(done) or last or preempted:
            state = objectives.checkpoint_state(*train_state)
            if interval.loss.count:  # losses since the last log
                loss = float(interval.loss.compute())
                _stop_unless_finite(loss, "training loss", done, checkpoints)
            if not checkpointing.is_finite(state):
                _stop_unless_finite(float("nan"), "model or optimiser state", done, checkpoints)
            with _writing_checkpoints(checkpoints, done):
                checkpoints.save(
                    done,
                    args=checkpointing.save_args(state, config, curve),
                    force=last or preempted,
                )
            writer.flush()  # the event files hold what the checkpoint holds
        if preempted:
            with _writing_checkpoints(checkpoints, done):
                checkpoints.wait_until_finished()
            raise Preempted(
                f"SIGTERM: saved the checkpoint at step {done} in {checkpoints.directory}; "
                "rerun the same command to resume."
            )
    with _writing_checkpoints(checkpoints, config.num_train_steps):
        checkpoints.wait_until_finished()


@contextlib.contextmanager
def _writing_checkpoints(checkpoints, step: int):
    """Turns orbax's failure to write (saves are asynchronous: an earlier save's may surface
    here) into one `CheckpointWriteFailed` line."""
    try:
        yield
    except Exception as error:  # orbax raises many kinds: ValueError, OSError, ...
        first_line = str(error).splitlines()[0][:300] if str(error) else ""
        raise CheckpointWriteFailed(
            f"writing checkpoints into {checkpoints.directory} failed by step {step} "
            f"({type(error).__name__}: {first_line}); was the directory removed, or the disk "
            "full? Rerun the same command to resume from the newest checkpoint that restores."
        ) from error


def _stop_unless_finite(value: float, what: str, step: int, checkpoints) -> None:
    if math.isfinite(value):
        return
    checkpoints.wait_until_finished()
    latest = checkpoints.latest_step()
    raise NonFiniteLoss(
        f"the {what} became non-finite ({value}) by step {step}; the last checkpoint, "
        f"{'step ' + str(latest) if latest else 'none'}, holds finite state. Lower "
        "optimizer.learning_rate or raise optimizer.warmup_steps, and start again in a new "
        f"--workdir (this one, {checkpoints.directory.parent}, keeps the failed run's config "
        "and refuses a changed one)."
    )
