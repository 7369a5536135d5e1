"""The trainer end to end on configs/default.py:tiny: outputs, resume, configs, data parallelism."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
from tiny_run import REPO, run_main, tiny_config, wait_for_checkpoint

from sdjax import checkpointing, config_lib, datasets, modalities, models, objectives, train
from sdjax.recipe import Recipe
from sdjax.sharding import BATCH_AXIS, data_parallel_mesh, replicate

LARGE_STEP = 1000.0  # SGD rate that makes one step's update large enough to compare


@pytest.mark.slow
def test_tiny_run_trains_and_writes_its_outputs(finished_run, data_dir):
    tmp_path, results = finished_run

    config, step = checkpointing.stored_config(tmp_path)
    stored_fields = config_lib.flat_fields(config)
    assert step == 24 and stored_fields == config_lib.flat_fields(tiny_config(data_dir))
    history = stored_history(tmp_path)
    losses = [entry["train/loss"] for entry in history]
    assert [entry["step"] for entry in history] == [4, 8, 12, 16, 20, 24]
    assert history[-1]["train/loss"] == results["final_train_loss"]
    assert np.all(np.isfinite(losses))
    # The same held-out batch and views before and after: deterministic, unlike batch losses.
    heldout = results["heldout_stage1_loss"]
    assert heldout["final"] < heldout["initial"] - 0.01, heldout
    for probe in ("linear_eval", "random_init"):
        metrics = results[probe]
        assert set(metrics) >= {"micro_f1", "macro_f1", "mAP", "micro_auc", "macro_auc"}
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert 0 <= metrics["mAP"] <= 1 and 0 <= metrics["macro_auc"] <= 1
    assert results["num_devices"] == 8  # the conftest's fake devices: data parallel
    assert (
        json.loads((tmp_path / "results.json").read_text())["linear_eval"] == results["linear_eval"]
    )
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (
        sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1]
        == 24
    )


@pytest.mark.slow
def test_bce_baseline_runs_through_the_same_trainer(data_dir, tmp_path):
    results = train.train_and_evaluate(
        tiny_config(data_dir, method="bce", **{"evals.random_init_probe": False}),
        tmp_path,
    )
    assert np.isfinite(results["final_train_loss"]) and "random_init" not in results
    assert np.isfinite(results["linear_eval"]["mAP"])


def stored_history(workdir):
    """The training curve that the newest checkpoint carries."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
        item = ocp.args.Composite(history=ocp.args.JsonRestore())
        return manager.restore(manager.latest_step(), args=item)["history"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss.positives": "supcon"}, "config.loss.positives: got 'supcon'"),
        ({"method": "simclr"}, "config.method: got 'simclr'"),
        ({"batch_size": 12}, "config.batch_size: got 12, expected a multiple of the 8"),
        ({"dataset.name": "imagenet"}, "config.dataset.name: got 'imagenet'"),
        ({"loss.temperature": 0.0}, "config.loss.temperature: got 0.0"),
        ({"loss.exchange": "gather"}, "config.loss.exchange: got 'gather'"),
        ({"num_train_steps": 0}, "config.num_train_steps: got 0"),
        ({"linear_eval.num_steps": 0}, "config.linear_eval.num_steps: got 0"),
    ],
)
def test_bad_configs_fail_before_compiling(data_dir, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(tiny_config(data_dir, **overrides), num_devices=8, num_processes=1)


def test_command_line_overrides_reach_the_config():
    argv = [
        "prog",
        f"--config={REPO / 'configs' / 'default.py'}:tiny",
        "--config.loss.positives=any",
        "--config.loss.temperature=0.2",
        "--config.model.encoder.stage_sizes=(2,1)",
    ]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.loss.positives == "any" and config.loss.temperature == 0.2
    assert tuple(config.model.encoder.stage_sizes) == (2, 1)
    assert (
        config.batch_size == config_lib.load_config_file("default", "tiny").batch_size
    )  # the rest is the file's


def test_bad_config_on_the_command_line_exits_with_a_clear_message(data_dir, tmp_path):
    code, output = run_main(tmp_path, data_dir, "--config.loss.positives=bogus")
    assert code == 2, output[-2000:]
    assert "Bad config: config.loss.positives: got 'bogus', expected one of" in output
    assert not (tmp_path / "checkpoints").exists()


# Long enough that SIGTERM after checkpoint 16 lands in stage 1; one probe is enough here.
LONGER = ("--config.num_train_steps=32", "--config.evals.random_init_probe=False")


@pytest.mark.slow
def test_kill_and_sigterm_then_resume_give_identical_results(data_dir, tmp_path):
    code, output = run_main(tmp_path / "straight", data_dir, *LONGER)
    assert code == 0, output[-3000:]
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    workdir = tmp_path / "interrupted"
    process = run_main(workdir, data_dir, *LONGER, wait=False)
    wait_for_checkpoint(workdir, 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    process = run_main(workdir, data_dir, *LONGER, wait=False)
    wait_for_checkpoint(workdir, 16, process)  # written by the resumed run
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved the checkpoint at step" in output
    assert not (workdir / "results.json").exists()

    code, output = run_main(workdir, data_dir, *LONGER)
    assert code == 0, output[-3000:]
    resumed = json.loads((workdir / "results.json").read_text())
    assert resumed["resumed_from_step"] >= 16
    assert resumed["linear_eval"] == straight["linear_eval"]
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert resumed["heldout_stage1_loss"] == straight["heldout_stage1_loss"]
    history = stored_history(workdir)
    assert [entry["step"] for entry in history] == list(range(4, 33, 4))


def one_training_step(data_dir, num_devices, **overrides):
    """(loss, parameter update) of one SGD step of the tiny model on 32 training mosaics; with
    MoCo, the momentum encoder's state after the step (EMA copy and queue) too."""
    config = tiny_config(data_dir, **overrides)
    batch = datasets.load_split(config.dataset.name, "train", data_dir=data_dir)
    images = modalities.to_float(batch["inputs"][:32])
    labels = batch["labels"][:32]
    mesh = data_parallel_mesh(jax.devices()[:num_devices])
    recipe = Recipe(config, mesh)
    state = recipe.create_state(labels.shape[1])
    state.optimizer = nnx.Optimizer(state.model, optax.sgd(LARGE_STEP), wrt=nnx.Param)
    nnx.update(state.optimizer, replicate(nnx.state(state.optimizer), mesh))
    initial = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(state.model, nnx.Param)))
    sharding = NamedSharding(mesh, P(BATCH_AXIS))
    step_metrics = recipe.train_step(
        state, jax.device_put(images, sharding), jax.device_put(labels, sharding), jnp.int32(3)
    )
    update = jax.tree.map(np.subtract, nnx.to_pure_dict(nnx.state(state.model, nnx.Param)), initial)
    largest = max(float(np.abs(u).max()) for u in jax.tree.leaves(update))
    assert largest > 0.1  # the step did move the parameters
    if state.momentum_encoder is not None:  # the EMA copy and the queue (floats, to compare)
        moco = nnx.state(state.momentum_encoder, nnx.Any(nnx.Param, models.QueueState))
        update["moco"] = jax.tree.map(lambda x: np.asarray(x, np.float32), nnx.to_pure_dict(moco))
    return float(step_metrics.loss.compute()), update


def assert_same_step(step, reference):
    """Losses of float32 sums in another order agree to 1e-5; the updates, LARGE_STEP times
    gradients of O(1e-3), to 1e-4 absolute (gradients that nearly cancel lose relative digits);
    MoCo's EMA weights and queued keys, computed before the update, hold to that too."""
    np.testing.assert_allclose(step[0], reference[0], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), step[1], reference[1]
    )


@pytest.mark.slow
def test_data_parallel_step_matches_single_device(data_dir):
    assert_same_step(one_training_step(data_dir, 4), one_training_step(data_dir, 1))


@pytest.mark.slow
def test_ring_exchange_step_matches_all_gather(data_dir):
    """config.loss.exchange reaches the loss: the ring gives the all_gather step."""
    ring = one_training_step(data_dir, 4, **{"loss.exchange": "ring"})
    assert_same_step(ring, one_training_step(data_dir, 4))


MOCO = {"framework": "moco", "moco.queue_size": 64, "moco.momentum": 0.9}


@pytest.mark.parametrize(
    ("overrides", "chunk_size"),
    [
        ({}, 16),  # 64 views, 2 per device and chunk
        (MOCO, 8),  # the 32 queries alone go through the trained encoder: 1 per device
        ({"method": "joint"}, 16),  # embeddings and the classifier's logits, chunk by chunk
        ({"method": "joint", **MOCO}, 16),
        ({"method": "bce", "num_views": 1}, 8),
    ],
    ids=["contrastive", "moco", "joint", "joint_moco", "bce"],
)
@pytest.mark.slow
def test_gradient_cached_step_matches_the_plain_step(data_dir, overrides, chunk_size):
    """Gradient caching on 8 devices gives the plain step of one device: the same loss,
    parameter update and (MoCo) momentum encoder and queue, for every method and framework."""
    plain = one_training_step(data_dir, 1, **overrides)
    cached = one_training_step(data_dir, 8, **overrides, embedding_chunk_size=chunk_size)
    assert_same_step(cached, plain)
    if "framework" in overrides:  # the step enqueued this batch's 32 keys
        assert int(cached[1]["moco"]["queue_pointer"]) == 32


@pytest.mark.slow
def test_bfloat16_tiny_run_trains(data_dir, tmp_path):
    config = tiny_config(data_dir, compute_dtype="bfloat16")
    config_lib.override(config, **{"evals.random_init_probe": False})
    results = train.train_and_evaluate(config, tmp_path)
    heldout = results["heldout_stage1_loss"]
    assert heldout["final"] < heldout["initial"] - 0.01, heldout
    assert np.isfinite(results["linear_eval"]["mAP"])


@pytest.mark.slow
def test_evaluation_runs_from_a_checkpoint_alone(finished_run, tmp_path):
    """`python -m sdjax.evaluate --workdir DIR`: the stored config and the newest checkpoint."""
    workdir, trained = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")  # nothing else travels
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdjax.evaluate",
            f"--workdir={copy}",
            f"--output_dir={tmp_path / 'evaluation'}",
        ],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    evaluated = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert evaluated["evaluated_step"] == 24
    assert json.loads(process.stdout.splitlines()[-1])["linear_eval"] == evaluated["linear_eval"]
    # The same 8 devices as the fixture: the same programs, the same numbers.
    assert evaluated["heldout_stage1_loss"] == trained["heldout_stage1_loss"]
    assert evaluated["linear_eval"] == trained["linear_eval"]
    assert evaluated["random_init"] == trained["random_init"]


@pytest.mark.slow
@pytest.mark.parametrize("only_matrices", [False, True])
def test_weight_decay_skips_vectors_only_when_asked(only_matrices):
    # Embeddings, kernels, and vectors: token weights, LayerNorm, biases.
    config = config_lib.load_config_file("debtags_joint", "tiny")
    config.optimizer.update(
        learning_rate=0.1, weight_decay=0.5, warmup_steps=0, decay_only_matrices=only_matrices
    )
    model = models.create_model(config, num_classes=5, seed=0)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    optimizer = objectives.create_optimizer(config, model)
    # Zero gradients: Adam's step is 0, so the update is the decay alone, lr * wd * param.
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shrink = 1 - float(objectives.learning_rate_schedule(config)(0)) * 0.5
    num_vectors = 0
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        new = np.asarray(new)
        decayed = old.ndim >= 2 or not only_matrices
        num_vectors += old.ndim < 2
        np.testing.assert_allclose(new, old * shrink if decayed else old, rtol=2**-22, atol=0)
    assert num_vectors > 0
