"""The trainer: contrastive pre-training, then linear evaluation on frozen features.

Stage 1 trains an encoder with a loss of the S-D family (`config.method = "contrastive"`), or
with sigmoid BCE (`"bce"`, the supervised baseline). Stage 2 fits a linear multi-label classifier
on frozen encoder features and scores the held-out split.

Data parallelism: a one-axis mesh over every device of every host. Batches are sharded along
it, parameters are replicated, and the loss gathers the contrast set across devices, so it is
the loss of the global batch; `jax.grad` is taken outside the loss's `shard_map`, which makes
the gradient exactly the single-device gradient of that global batch.

Determinism: the data order and the augmentations are pure functions of (seed, step) and the
model state is checkpointed, so a run resumed from any checkpoint ends with the same metrics as
an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sdjax import evaluation, input_pipeline, losses, models

BATCH_AXIS = "data"


class Preempted(Exception):
    """SIGTERM arrived; the state was saved and the run can be resumed."""


# --------------------------------------------------------------------------------------------
# Config checks: every mistake is reported before anything compiles
# --------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the config field for any setting that cannot work."""

    def fail(field: str, got: Any, expected: str):
        raise ValueError(f"config.{field}: got {got!r}, expected {expected}.")

    if config.method not in ("contrastive", "bce"):
        fail("method", config.method, '"contrastive" or "bce"')
    if config.loss.positives not in losses.POSITIVES:
        fail("loss.positives", config.loss.positives, f"one of {losses.POSITIVES}")
    if not config.loss.temperature > 0:
        fail("loss.temperature", config.loss.temperature, "a number > 0")
    if not 0 < config.loss.jaccard_threshold <= 1:
        fail("loss.jaccard_threshold", config.loss.jaccard_threshold, "a number in (0, 1]")
    if config.loss.block_size < 0:
        fail("loss.block_size", config.loss.block_size, "0 (automatic) or a positive int")
    if config.dataset.name not in input_pipeline.DATASETS:
        fail("dataset.name", config.dataset.name, f"one of {sorted(input_pipeline.DATASETS)}")
    if config.num_views < 1:
        fail("num_views", config.num_views, "an int >= 1")
    for field in (
        "num_train_steps",
        "checkpoint_every_steps",
        "linear_eval.num_steps",
        "linear_eval.batch_size",
    ):
        value = functools.reduce(lambda node, key: node[key], field.split("."), config)
        if value < 1:
            fail(field, value, "an int >= 1")
    num_devices, num_processes = jax.device_count(), jax.process_count()
    for field in ("batch_size", "eval_batch_size"):  # both are split over devices and hosts
        if config[field] < 1 or config[field] % num_devices:
            fail(field, config[field], f"a positive multiple of the {num_devices} devices")
        if config[field] % num_processes:
            fail(field, config[field], f"a multiple of the {num_processes} processes")


def check_data_fits_model(config: ml_collections.ConfigDict, inputs: np.ndarray) -> None:
    """Raises ValueError when the encoder's input fields disagree with the loaded data."""
    encoder = config.model.encoder
    expected = {
        "resnet": ("in_channels", inputs.shape[-1]),
        "mlp": ("in_features", inputs.shape[-1]),
        "transformer": ("max_length", inputs.shape[-1]),
    }.get(encoder.name)
    if expected and encoder[expected[0]] != expected[1]:
        raise ValueError(
            f"config.model.encoder.{expected[0]}: got {encoder[expected[0]]!r}, expected "
            f"{expected[1]} for {config.dataset.name} inputs of shape {inputs.shape[1:]}."
        )
    if encoder.name == "transformer" and inputs.max() >= encoder.vocab_size:
        raise ValueError(
            f"config.model.encoder.vocab_size: got {encoder.vocab_size}, expected > "
            f"{inputs.max()}, the largest token id of {config.dataset.name}."
        )


# --------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.optimizer.learning_rate,
        warmup_steps=config.optimizer.warmup_steps,
        decay_steps=config.num_train_steps,
    )


def create_model(config: ml_collections.ConfigDict, num_classes: int, seed: int):
    """Encoder plus the stage-1 head: projection (contrastive) or linear classifier (bce)."""
    rngs = nnx.Rngs(seed)
    encoder = models.create_encoder(config.model.encoder, rngs=rngs)
    if config.method == "bce":
        head = models.LinearClassifier(encoder.features_dim, num_classes, rngs=rngs)
    else:
        head = models.ProjectionHead(
            encoder.features_dim,
            config.model.projection_hidden_dim,
            config.model.projection_dim,
            rngs=rngs,
        )
    return models.ContrastiveModel(encoder, head)


def make_stage1_loss(config, mesh) -> Callable:
    """`loss(model, inputs, labels, step)`: the stage-1 loss of a global batch on `mesh`."""
    modality = input_pipeline.DATASETS[config.dataset.name].modality
    base_key = jax.random.key(config.seed)
    num_views = config.num_views if config.method == "contrastive" else 1
    sharded_loss = losses.make_sharded_loss(
        mesh,
        BATCH_AXIS,
        positives=config.loss.positives,
        temperature=float(config.loss.temperature),
        jaccard_threshold=float(config.loss.jaccard_threshold),
        block_size=config.loss.block_size or None,
    )

    def loss_fn(model, inputs, labels, step):
        # Augmentations depend on (seed, step) only, so a resumed run sees the same views.
        views = input_pipeline.make_views(
            modality, jax.random.fold_in(base_key, step), inputs, num_views=num_views
        )
        outputs = model(views.reshape((-1, *views.shape[2:])))
        if config.method == "bce":
            return optax.sigmoid_binary_cross_entropy(outputs, labels).mean()
        return sharded_loss(outputs.reshape((views.shape[0], num_views, -1)), labels)

    return loss_fn


def make_train_step(config, mesh) -> Callable:
    """One stage-1 step on a global batch sharded over `mesh`."""
    loss_fn = make_stage1_loss(config, mesh)

    @nnx.jit
    def train_step(model, optimizer, inputs, labels, step):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, labels, step)
        optimizer.update(model, grads)
        return loss

    return train_step


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every_steps,
            max_to_keep=config.max_checkpoints_to_keep,
        ),
    )


def training_state(model, optimizer) -> dict:
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def restore_latest(manager, model, optimizer) -> int:
    """Restores the latest checkpoint into model and optimizer; returns its step (0 if none)."""
    step = manager.latest_step()
    if step is None:
        return 0
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, training_state(model, optimizer))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    logging.info("Resumed from the checkpoint at step %d.", step)
    return step


# --------------------------------------------------------------------------------------------
# Data placement
# --------------------------------------------------------------------------------------------


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_host_batch(local_batch: np.ndarray, mesh) -> jax.Array:
    """This host's slice of a global batch -> a global array sharded along the batch axis."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(BATCH_AXIS)), local_batch)


def shard_global_batch(global_batch: np.ndarray, mesh) -> jax.Array:
    """A global batch that every host holds whole -> sharded, each host giving its slice."""
    per_host = len(global_batch) // jax.process_count()
    start = jax.process_index() * per_host
    return shard_host_batch(global_batch[start : start + per_host], mesh)


def encode_all(model, inputs: np.ndarray, modality: str, batch_size: int, mesh) -> np.ndarray:
    """Frozen encoder features of every example, on every host (numpy in, numpy out)."""
    encode = nnx.jit(lambda model, x: model.encode(x))
    features = []
    for start in range(0, len(inputs), batch_size):
        chunk = input_pipeline.model_inputs(modality, inputs[start : start + batch_size])
        pad = batch_size - len(chunk)
        chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        encoded = encode(model, shard_global_batch(chunk, mesh))
        features.append(multihost_utils.process_allgather(encoded, tiled=True)[: batch_size - pad])
    return np.concatenate(features)


# --------------------------------------------------------------------------------------------
# Stage 2: linear evaluation
# --------------------------------------------------------------------------------------------


def linear_evaluation(config, train_features, train_labels, test_features, test_labels):
    """Fits a linear multi-label classifier with sigmoid BCE.

    Returns:
      (held-out metrics, held-out scores float32 [N, C]).
    """
    eval_config = config.linear_eval
    # Standardising with training statistics makes one learning rate fit every encoder.
    mean, std = train_features.mean(axis=0), train_features.std(axis=0) + 1e-6
    train_x = jnp.asarray((train_features - mean) / std)
    test_x = jnp.asarray((test_features - mean) / std)
    train_y = jnp.asarray(train_labels)
    classifier = models.LinearClassifier(
        train_x.shape[1], train_y.shape[1], rngs=nnx.Rngs(config.seed + 1)
    )
    optimizer = nnx.Optimizer(
        classifier,
        optax.adamw(
            optax.cosine_decay_schedule(eval_config.learning_rate, eval_config.num_steps),
            weight_decay=eval_config.weight_decay,
        ),
        wrt=nnx.Param,
    )

    @nnx.jit
    def step(classifier, optimizer, x, y):
        def loss_fn(classifier):
            return optax.sigmoid_binary_cross_entropy(classifier(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(classifier)
        optimizer.update(classifier, grads)
        return loss

    batch_size = min(eval_config.batch_size, len(train_x))
    for i in range(eval_config.num_steps):
        indices = input_pipeline.batch_indices(
            len(train_x), global_batch_size=batch_size, seed=config.seed + 1, step=i
        )
        step(classifier, optimizer, train_x[indices], train_y[indices])
    scores = np.asarray(jax.nn.sigmoid(classifier(test_x)))
    return evaluation.multilabel_metrics(scores, test_labels), scores


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def load_history(path: Path, up_to_step: int) -> list[dict]:
    """The logged training curve, without entries past the step a resumed run restarts from."""
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [entry for entry in entries if entry["step"] <= up_to_step]


def plot_history(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [entry["train_loss"] for entry in history])
    ax_loss.set(xlabel="step", ylabel="training loss (interval mean)", title=title)
    ax_lr.plot(steps, [entry["learning_rate"] for entry in history])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs (or resumes) stage 1 and stage 2 in `workdir`; returns the results dict.

    SIGTERM during stage 1 saves a checkpoint and raises `Preempted`; during stage 2, which takes
    seconds, the run finishes first.

    Raises:
      ValueError: for a bad config, before anything compiles.
      Preempted: after saving a checkpoint, when SIGTERM arrived.
    """
    stop_requested = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    try:
        return _train_and_evaluate(config, Path(workdir), stop_requested)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _train_and_evaluate(config, workdir: Path, stop_requested: list) -> dict:
    check_config(config)
    workdir.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    mesh = jax.make_mesh(
        (jax.device_count(),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )

    train, test = input_pipeline.load_train_and_test(config.dataset)
    check_data_fits_model(config, train["inputs"])
    modality = input_pipeline.DATASETS[config.dataset.name].modality
    num_classes = train["labels"].shape[1]
    logging.info(
        "Dataset %s: %d train / %d test examples, %d labels, %d devices on %d hosts.",
        config.dataset.name,
        len(train["labels"]),
        len(test["labels"]),
        num_classes,
        jax.device_count(),
        jax.process_count(),
    )

    model = create_model(config, num_classes, config.seed)
    schedule = learning_rate_schedule(config)
    optimizer = nnx.Optimizer(
        model,
        optax.adamw(schedule, weight_decay=config.optimizer.weight_decay),
        wrt=nnx.Param,
    )
    nnx.update(model, replicate(nnx.state(model), mesh))
    nnx.update(optimizer, replicate(nnx.state(optimizer), mesh))
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(model, nnx.Param)), msg="Model parameters"
    )

    manager = checkpoint_manager(workdir, config)
    start_step = restore_latest(manager, model, optimizer)
    history_path = workdir / "history.jsonl"
    history = load_history(history_path, start_step)
    history_path.write_text("".join(json.dumps(entry) + "\n" for entry in history))

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    if start_step == 0:
        writer.write_hparams(
            {k: v for k, v in config.to_dict().items() if isinstance(v, int | float | str)}
        )
    train_step = make_train_step(config, mesh)
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=config.num_train_steps, writer=writer, every_secs=30
    )

    stage1_start = time.time()
    interval_losses = []
    for step in range(start_step, config.num_train_steps):
        indices = input_pipeline.batch_indices(
            len(train["labels"]),
            global_batch_size=config.batch_size,
            seed=config.seed,
            step=step,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        inputs = input_pipeline.model_inputs(modality, train["inputs"][indices])
        labels = shard_host_batch(train["labels"][indices], mesh)
        interval_losses.append(
            train_step(model, optimizer, shard_host_batch(inputs, mesh), labels, step)
        )
        done = step + 1
        report_progress(done)
        if done % config.log_every_steps == 0 or done == config.num_train_steps:
            # The mean over the interval: single batch losses are too noisy to read.
            entry = {
                "step": done,
                "train_loss": float(np.mean(jax.device_get(interval_losses))),
                "learning_rate": float(schedule(step)),
            }
            if not np.isfinite(entry["train_loss"]):
                raise FloatingPointError(f"training loss is {entry['train_loss']} at step {done}")
            writer.write_scalars(done, {"train/loss": entry["train_loss"]})
            with history_path.open("a") as history_file:
                history_file.write(json.dumps(entry) + "\n")
            history.append(entry)
            interval_losses = []
        manager.save(
            done,
            args=ocp.args.StandardSave(training_state(model, optimizer)),
            force=done == config.num_train_steps or bool(stop_requested),
        )
        if stop_requested:
            manager.wait_until_finished()
            raise Preempted(
                f"SIGTERM: saved the checkpoint at step {done} in {workdir / 'checkpoints'}; "
                "rerun the same command to resume."
            )
    manager.wait_until_finished()
    stage1_seconds = time.time() - stage1_start

    results = {
        "config": config.to_dict(),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "resumed_from_step": start_step,
        "stage1_seconds": stage1_seconds,
        "final_train_loss": history[-1]["train_loss"] if history else None,
    }
    stage2_start = time.time()
    # The stage-1 loss on a fixed held-out batch, before (the seed's initial model) and after.
    heldout_loss = nnx.jit(make_stage1_loss(config, mesh))
    heldout = min(config.batch_size, len(test["labels"]) // jax.device_count() * jax.device_count())
    heldout_batch = (
        shard_global_batch(input_pipeline.model_inputs(modality, test["inputs"][:heldout]), mesh),
        shard_global_batch(test["labels"][:heldout], mesh),
    )
    initial_model = create_model(config, num_classes, config.seed)
    nnx.update(initial_model, replicate(nnx.state(initial_model), mesh))
    results["heldout_stage1_loss"] = {
        "initial": float(heldout_loss(initial_model, *heldout_batch, -1)),
        "final": float(heldout_loss(model, *heldout_batch, -1)),
    }
    probes = {"linear_eval": model}
    if config.linear_eval.random_init_baseline:
        probes["random_init"] = initial_model
    for name, probed_model in probes.items():
        train_features, test_features = (
            encode_all(probed_model, split["inputs"], modality, config.eval_batch_size, mesh)
            for split in (train, test)
        )
        results[name], scores = linear_evaluation(
            config, train_features, train["labels"], test_features, test["labels"]
        )
        if name == "linear_eval" and config.linear_eval.save_test_outputs and is_chief:
            # For analyses past the summary metrics: per-label results, embedding plots.
            np.savez_compressed(
                workdir / "test_outputs.npz",
                features=test_features.astype(np.float16),
                scores=scores.astype(np.float16),
                labels=test["labels"].astype(np.uint8),
                train_label_counts=train["labels"].sum(axis=0),
            )
        writer.write_scalars(
            config.num_train_steps, {f"{name}/{k}": v for k, v in results[name].items()}
        )
    results["stage2_seconds"] = time.time() - stage2_start
    writer.flush()
    if is_chief:
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if history:
            title = (
                config.method
                if config.method == "bce"
                else f"{config.loss.positives} loss, τ={config.loss.temperature}"
            )
            plot_history(history, workdir / "training_curves.png", title)
    return results
