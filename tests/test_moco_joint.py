"""The trainer's MoCo framework (momentum encoder, label-carrying queue) and the joint method."""

import json
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tiny_run import run_main, tiny_config, wait_for_checkpoint

from sdjax import (
    checkpointing,
    config_lib,
    datasets,
    losses,
    metrics,
    modalities,
    objectives,
    train,
)
from sdjax.models import MomentumEncoder
from sdjax.recipe import Recipe
from sdjax.sharding import BATCH_AXIS, data_parallel_mesh

MOCO = {"framework": "moco", "moco.queue_size": 128, "moco.momentum": 0.9}
# The CLI runs need one probe only.
MOCO_FLAGS = [f"--config.{k}={v}" for k, v in MOCO.items()]
MOCO_FLAGS.append("--config.evals.random_init_probe=False")
# float32 losses of a few hundred terms computed in another order (sharded vs one device, or
# this file's direct formula): rounding differs by a few ulps of values near 1.
RTOL = 1e-5


def batch_of(config, data_dir, size=32):
    data = datasets.load_split(config.dataset.name, "train", data_dir=data_dir)
    return modalities.to_float(data["inputs"][:size]), data["labels"][:size]


def moco_recipe(config, num_classes, num_devices):
    recipe = Recipe(config, data_parallel_mesh(jax.devices()[:num_devices]))
    return recipe, recipe.create_state(num_classes)


@pytest.mark.slow
def test_moco_steps_match_the_query_key_loss_with_an_ema_encoder_and_a_fifo_queue(data_dir):
    """Three steps on 8 devices against the loss computed on one device from its definition:
    queries = view 0 through the trained model, keys = view 1 through the EMA copy, the queue =
    the earlier batches' keys (newest overwrite the oldest), empty entries left out."""
    config = tiny_config(data_dir, **{**MOCO, "moco.queue_size": 64})
    images, labels = batch_of(config, data_dir)
    recipe, state = moco_recipe(config, labels.shape[1], 8)
    model, momentum_encoder = state.model, state.momentum_encoder
    sharding = NamedSharding(recipe.mesh, P(BATCH_AXIS))
    ema = nnx.state(model, nnx.Param)  # the key encoder starts as a copy
    queue_keys, queue_labels = [], []  # what the queue should hold, oldest first
    momentum = config.moco.momentum
    for step in range(3):
        params = nnx.state(model, nnx.Param)
        ema = jax.tree.map(lambda k, q: momentum * k + (1 - momentum) * q, ema, params)
        views = recipe.views(jnp.asarray(images), step)
        key_model = nnx.clone(model)
        nnx.update(key_model, ema)
        keys = np.asarray(key_model(views[:, 1]))
        queries = np.asarray(model(views[:, 0]))
        held = min(len(queue_keys), 2)  # a queue of 64 holds the last two batches of 32
        expected = losses.multilabel_supcon_loss(
            queries,
            labels,
            positives=config.loss.positives,
            temperature=config.loss.temperature,
            keys=losses.Keys(
                np.concatenate([keys, *queue_keys[-held:]] if held else [keys]),
                np.concatenate([labels, *queue_labels[-held:]]),
                sample_ids=np.concatenate([np.arange(32), np.full(32 * held, -1)]),
            ),
        )
        got = recipe.train_step(
            state,
            jax.device_put(images, sharding),
            jax.device_put(labels, sharding),
            jnp.int32(step),
        )
        np.testing.assert_allclose(float(got.loss.compute()), float(expected), rtol=RTOL)
        queue_keys.append(keys)
        queue_labels.append(labels)
        encoder_ema = nnx.state(momentum_encoder.encoder, nnx.Param)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            nnx.to_pure_dict(encoder_ema),
            nnx.to_pure_dict(ema["encoder"]),
        )
    # Ring buffer of 64 after 3 batches of 32: batch 2 in rows 0..31, batch 1 in rows 32..63.
    queue = momentum_encoder.queue.value
    np.testing.assert_allclose(np.asarray(queue[:32]), queue_keys[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(queue[32:]), queue_keys[1], rtol=1e-5, atol=1e-6)
    assert int(momentum_encoder.queue_pointer.value) == 32
    assert bool(momentum_encoder.queue_valid.value.all())
    assert queue.sharding.is_equivalent_to(sharding, 2)  # still split over the 8 devices


@pytest.mark.slow
def test_a_partly_filled_queue_masks_its_empty_entries(data_dir):
    config = tiny_config(data_dir, **MOCO)
    _, labels = batch_of(config, data_dir, size=8)
    model = objectives.create_model(config, labels.shape[1])
    encoder = MomentumEncoder(model, queue_size=24, num_classes=labels.shape[1])
    keys = jnp.ones((8, config.model.projection_dim))
    encoder.enqueue(keys, labels)
    contrast = objectives.MoCo.contrast_with_queue(encoder, 2 * keys, labels)
    assert contrast.features.shape == (32, config.model.projection_dim)
    np.testing.assert_array_equal(contrast.mask, [True] * 16 + [False] * 16)
    np.testing.assert_array_equal(contrast.sample_ids, [*range(8)] + [-1] * 24)
    np.testing.assert_array_equal(contrast.labels[8:16], labels)
    assert int(encoder.queue_pointer.value) == 8


@pytest.mark.slow
def test_joint_loss_is_bce_plus_weighted_contrastive_loss(data_dir):
    config = tiny_config(data_dir, method="joint", **{"loss.joint_weight": 0.3})
    images, labels = batch_of(config, data_dir, size=16)
    recipe = Recipe(config, data_parallel_mesh(jax.devices()[:1]))
    model = recipe.create_model(labels.shape[1])
    got = recipe.loss(model, jnp.asarray(images), labels, 5)
    views = recipe.views(jnp.asarray(images), 5)  # [16, 2, ...]
    contrastive = losses.multilabel_supcon_loss(
        jnp.stack([model(views[:, v]) for v in range(2)], axis=1),
        labels,
        positives=config.loss.positives,
        temperature=config.loss.temperature,
    )
    logits = jnp.stack([model.classify(views[:, v]) for v in range(2)], axis=1)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels[:, None, :]).mean()
    np.testing.assert_allclose(float(got), float(bce + 0.3 * contrastive), rtol=RTOL)


@pytest.mark.slow
def test_joint_run_reports_the_classifier_and_the_linear_probe(data_dir, tmp_path):
    config = tiny_config(data_dir, method="joint", **MOCO)
    results = train.train_and_evaluate(config, tmp_path)
    assert set(results["classifier"]) == set(results["linear_eval"])
    # The classifier's metrics, recomputed from the checkpointed model on the raw test inputs.
    recipe = Recipe(config, data_parallel_mesh())
    test = datasets.load_split(config.dataset.name, "test", data_dir=data_dir)
    state = recipe.create_state(test["labels"].shape[1])
    recipe.restore(state, checkpointing.restore_state(tmp_path, 24, recipe.checkpoint(state)))
    scores = jax.nn.sigmoid(state.model.classify(modalities.to_float(test["inputs"])))
    expected = metrics.multilabel_metrics(np.asarray(scores), test["labels"])
    for name, value in expected.items():
        # Same classifier; the features come in batches of 128 over 8 devices there.
        np.testing.assert_allclose(results["classifier"][name], value, rtol=1e-4, atol=1e-4)
    assert results["classifier"] != results["linear_eval"]  # not the probe under another name
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["classifier"] == results["classifier"]


@pytest.mark.slow
def test_moco_run_resumes_identically_after_sigkill(data_dir, tmp_path):
    code, output = run_main(tmp_path / "straight", data_dir, *MOCO_FLAGS)
    assert code == 0, output[-3000:]
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())

    workdir = tmp_path / "killed"
    process = run_main(workdir, data_dir, *MOCO_FLAGS, wait=False)
    wait_for_checkpoint(workdir, 8, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not (workdir / "results.json").exists()

    code, output = run_main(workdir, data_dir, *MOCO_FLAGS)
    assert code == 0, output[-3000:]
    resumed = json.loads((workdir / "results.json").read_text())
    assert 8 <= resumed["resumed_from_step"] < 24
    for key in ("linear_eval", "final_train_loss", "heldout_stage1_loss"):
        assert resumed[key] == straight[key], key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"framework": "simclr"}, "config.framework: got 'simclr'"),
        ({"framework": "moco", "method": "bce"}, "config.method: got 'bce', expected"),
        ({"framework": "moco", "num_views": 3}, "config.num_views: got 3, expected 2"),
        ({"moco.queue_size": 100, "framework": "moco"}, "config.moco.queue_size: got 100"),
        ({"moco.momentum": 1.0}, "config.moco.momentum: got 1.0, expected a number in [0, 1)"),
        ({"loss.joint_weight": -1.0}, "config.loss.joint_weight: got -1.0"),
    ],
)
def test_bad_moco_and_joint_configs_fail_before_compiling(data_dir, overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(tiny_config(data_dir, **overrides), num_devices=8, num_processes=1)


def test_mulsupcon_setting_takes_every_profile():
    for profile in config_lib.PROFILES:
        config = config_lib.load_config_file("mulsupcon_setting", profile)
        config_lib.check_config(config, num_devices=8, num_processes=1)
        assert config.framework == "moco" and config.loss.positives == "mulsupcon"
        assert config.loss.temperature == 0.1 and config.moco.momentum == 0.999


@pytest.mark.slow
def test_the_joint_classifier_can_have_its_own_learning_rate(data_dir):
    """AdamW's update is proportional to its learning rate: with a classifier rate 10x the
    encoder's, one step moves the classifier exactly as AdamW at 10x moves it."""
    # No warmup: the first step runs at the peak learning rate (warmup starts at 0).
    joint = {"method": "joint", "optimizer.warmup_steps": 0}
    rate = tiny_config(data_dir).optimizer.learning_rate
    configs = {
        "mixed": tiny_config(
            data_dir, **joint, **{"optimizer.classifier_learning_rate": 10 * rate}
        ),
        "plain": tiny_config(data_dir, **joint),
        "fast": tiny_config(data_dir, **joint, **{"optimizer.learning_rate": 10 * rate}),
    }
    moved = {}
    for name, run_config in configs.items():
        model = objectives.create_model(run_config, 10)
        optimizer = objectives.create_optimizer(run_config, model)
        params = nnx.state(model, nnx.Param)  # its Variables: the update changes them
        before = jax.tree.map(np.array, params)
        optimizer.update(model, jax.tree.map(jnp.ones_like, params))
        after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
        moved[name] = jax.tree.map(lambda a, b: a - b, after, before)
    for part, reference in (("classifier", "fast"), ("encoder", "plain"), ("head", "plain")):
        pairs = zip(
            jax.tree.leaves(moved["mixed"][part]),
            jax.tree.leaves(moved[reference][part]),
            strict=True,
        )
        for got, expected in pairs:  # float32 updates of one formula: a few ulps apart at most
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert not np.allclose(
        jax.tree.leaves(moved["mixed"]["classifier"])[0],
        jax.tree.leaves(moved["plain"]["classifier"])[0],
    )
