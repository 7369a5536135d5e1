"""Training needs no TensorFlow: the `train` extra prepares the embedded datasets, trains,
evaluates and writes TensorBoard logs with TensorFlow absent (tests/without_tensorflow.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tiny_run import REPO

HIDE_TENSORFLOW = [sys.executable, str(REPO / "tests" / "without_tensorflow.py")]


def run_without_tensorflow(module, *args):
    done = subprocess.run(
        [*HIDE_TENSORFLOW, module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    return done.returncode, done.stderr


def test_the_helper_hides_an_installed_tensorflow(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import importlib.util\n"
        "print(importlib.util.find_spec('tensorflow') is None)\n"
        "try:\n"
        "    import tensorflow\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name)\n"
    )
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    hidden = subprocess.run(
        [*HIDE_TENSORFLOW, "probe"], env=environment, capture_output=True, text=True, timeout=60
    )
    assert hidden.stdout.split() == ["True", "tensorflow"], hidden.stderr
    assert importlib.util.find_spec("tensorflow") is not None  # installed here: hidden above


def train_without_tensorflow(config_file, workdir, data_dir):
    """`python -m sdjax.main` with TensorFlow hidden: (exit code, stderr)."""
    return run_without_tensorflow(
        "sdjax.main",
        f"--config={REPO / 'configs' / config_file}",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
    )


@pytest.mark.slow
def test_tiny_run_prepares_trains_and_evaluates_without_tensorflow(tmp_path):
    data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
    code, err = train_without_tensorflow("default.py:tiny", workdir, data_dir)
    assert code == 0, err[-3000:]
    trained = json.loads((workdir / "results.json").read_text())
    assert (data_dir / "mnist_mosaic" / "tiny").is_dir()  # prepared here, without TensorFlow

    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"scalars": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [event.step for event in losses] == [4, 8, 12, 16, 20, 24]
    # Event files hold float32: equal to results.json's values up to float32 rounding (6e-8).
    assert losses[-1].value == pytest.approx(trained["final_train_loss"], rel=1e-6)
    assert events.Scalars("linear_eval/mAP")[-1].value == pytest.approx(
        trained["linear_eval"]["mAP"], rel=1e-6
    )
    start = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["loss.positives"].string_value == "sd"
    assert hparams["batch_size"].number_value == trained["config"]["batch_size"]

    evaluated = tmp_path / "evaluated"  # evaluating writes nothing into the run's workdir
    code, err = run_without_tensorflow(
        "sdjax.evaluate", f"--workdir={workdir}", f"--output_dir={evaluated}"
    )
    assert code == 0, err[-3000:]
    reevaluated = json.loads((evaluated / "results.json").read_text())
    assert reevaluated["evaluated_step"] == 24
    # The same probe on the same parameters, restored from the checkpoint: the same numbers.
    assert reevaluated["linear_eval"] == trained["linear_eval"]


def test_a_dataset_that_needs_tensorflow_names_the_extra_in_one_line(tmp_path):
    code, err = train_without_tensorflow("voc2007.py", tmp_path, tmp_path / "tfds")
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "Cannot run: config.dataset.name: 'voc2007' needs TensorFlow to prepare and decode its "
        "images, and it is not installed: pip install 'sdjax[prepare]'."
    )
