"""The trainer: contrastive pre-training (stage 1), then the evaluators on frozen features.

Stage 1 trains an encoder with a loss of the S-D family (`config.method = "contrastive"`), with
sigmoid BCE (`"bce"`, the supervised baseline), or with both (`"joint"`: a linear classifier's BCE
plus `loss.joint_weight` times the contrastive loss). The contrast set is the global batch
(`config.framework = "in_batch"`) or MoCo's keys and queue (`"moco"`). `sdjax.recipe.Recipe`
holds all of that (the model, the train state, the loss, the step, what is checkpointed); this
loop only calls it. Then `sdjax.evaluate` runs the evaluators that `config.evals` switches on
(`sdjax.evaluators`: held-out loss, linear probes, the joint classifier's own metrics, test
outputs, the long tail), which also run on any checkpoint on their own.

Data parallelism: a one-axis mesh over every device of every host (see `sdjax.recipe`).

Determinism: the data order and the augmentations are pure functions of (seed, step) and the
train state (with MoCo's momentum encoder and queue) is checkpointed, so a run resumed from any
checkpoint ends with the same metrics as an uninterrupted one.
"""

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from clu import parameter_overview
from flax import nnx

from sdjax import (
    checkpointing,
    config_lib,
    datasets,
    evaluate,
    evaluators,
    input_pipeline,
    metric_writers,
    reporting,
)
from sdjax.recipe import Recipe, TrainMetrics, TrainState
from sdjax.sharding import data_parallel_mesh, shard_host_batch

STOPPED_BEFORE_TRAINING = "SIGTERM before the first training step: stopped; rerun to resume."


class Preempted(Exception):
    """SIGTERM arrived; the state was saved (if training had begun) and the run can resume."""


class NonFiniteLoss(FloatingPointError):
    """The training loss or state became non-finite; nothing non-finite was checkpointed."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (its directory removed, a full disk, ...)."""


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
      config_lib.ConfigError: a bad config (checked first; one found only once the data
        loaded leaves the workdir as it was), or a workdir that holds another config's run.
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
    evaluators.check_config(config)
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
    recipe = Recipe(config, mesh)
    state = recipe.create_state(num_classes=train["labels"].shape[1])
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(state.model, nnx.Param)), msg="Model parameters"
    )
    checkpoints, start_step, restored, history = checkpointing.restore_latest(
        workdir, config, recipe.checkpoint(state)
    )
    recipe.restore(state, restored)

    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if start_step == 0:
        writer.write_hparams(config_lib.flat_fields(config))
    stage1_start = time.time()
    with checkpointing.background_errors_held(reported_as=CheckpointWriteFailed):
        history = _train_stage1(config, recipe, train, state, checkpoints, writer, history, sigterm)
    stage1_seconds = time.time() - stage1_start

    results = {
        "config": config.to_dict(),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "resumed_from_step": start_step,
        "stage1_seconds": stage1_seconds,
        "final_train_loss": history[-1]["train/loss"] if history else None,
    }
    results |= evaluate.evaluate(config, state.model, data, mesh, workdir, writer)
    writer.close()
    if is_chief:
        reporting.write_results(workdir, results)
        reporting.plot_training_curve(config, history, workdir / "training_curves.png")
    return results


def _train_stage1(
    config, recipe: Recipe, train, state: TrainState, checkpoints, writer, history, sigterm
) -> list[dict]:
    """Stage 1 from the last checkpoint's step: logs intervals, saves only finite states.

    `state` is updated in place. `history` is the training curve restored with the checkpoint
    (the logged `train/*` scalars, one entry per log step); the curve extended to the end is
    returned, and every checkpoint stores it as it stands at that step.
    """
    history = list(history)
    start_step = checkpoints.latest_step() or 0
    batches = input_pipeline.training_batches(config, train)
    mesh = recipe.mesh
    report_progress = metric_writers.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer, every_secs=30
    )
    # The state's graph is walked once, not at every step (ResNet-50 on 2 cores: ~20 ms a step).
    train_step = nnx.cached_partial(recipe.train_step, state)
    interval = TrainMetrics.empty()
    for step in range(start_step, config.num_train_steps):
        batch = batches.host_batch(step)
        interval = interval.merge(
            train_step(
                shard_host_batch(batch["inputs"], mesh),
                shard_host_batch(batch["labels"], mesh),
                step,
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
            history.append({"step": done, **logged})
            interval = TrainMetrics.empty()
        if checkpoints.should_save(done) or last or preempted:
            saved = recipe.checkpoint(state)
            if interval.loss.count:  # losses since the last log
                loss = float(interval.loss.compute())
                _stop_unless_finite(loss, "training loss", done, checkpoints)
            if not checkpointing.is_finite(saved):
                _stop_unless_finite(float("nan"), "model or optimiser state", done, checkpoints)
            with _writing_checkpoints(checkpoints, done):
                checkpoints.save(
                    done,
                    args=checkpointing.save_args(saved, config, list(history)),
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
    return history


@contextlib.contextmanager
def _writing_checkpoints(checkpoints, step: int):
    """Turns orbax's failure to write (saves are asynchronous: an earlier save's may surface
    here) into one `CheckpointWriteFailed` line."""
    try:
        checkpointing.check_directory(checkpoints)
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
