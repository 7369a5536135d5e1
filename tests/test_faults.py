"""One test per fault of issue 13: each asserts what a user gets, not the absence of a crash."""

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from loopback import clean_environment, free_port, start_two_hosts, wait_for_all
from oracle import oracle
from test_experiments import suite, write
from tiny_run import REPO, run_main, tiny_config

from sdjax import checkpointing, config_lib, datasets, losses, multihost, train

WORKER = REPO / "tests" / "multihost_train_worker.py"

# --------------------------------------------------------------------------------------------
# Trainer: workdir, checkpoints, config errors, multi-host
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_with_a_result_changing_config_names_the_fields(data_dir, finished_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    changed = tiny_config(data_dir, **{"loss.positives": "any", "seed": 3})
    with pytest.raises(config_lib.ConfigError) as error:
        train.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "loss.positives: 'sd' -> 'any'" in message and "seed: 0 -> 3" in message, message
    assert "log_every_steps" not in message
    # Fields that cannot change results may differ: the run resumes (at its end) and evaluates.
    results = train.train_and_evaluate(tiny_config(data_dir, log_every_steps=8), workdir)
    assert results["resumed_from_step"] == 24
    assert results["linear_eval"] == finished_run[1]["linear_eval"]


@pytest.mark.slow
def test_a_second_process_on_a_workdir_in_use_is_refused(data_dir, tmp_path):
    with checkpointing.WorkdirLock(tmp_path):  # this process holds the workdir
        code, output = run_main(tmp_path, data_dir)
    assert code == 2, output[-2000:]
    assert f"Cannot run: workdir {tmp_path} is in use by another run" in output
    assert not (tmp_path / "checkpoints").exists()


def truncate_files(step_dir: Path):
    for path in step_dir.rglob("*"):
        if path.is_file() and path.stat().st_size > 16:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_directory(step_dir: Path):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def delete_the_state(step_dir: Path):
    shutil.rmtree(step_dir / "state")


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_files, empty_directory, delete_the_state])
def test_a_damaged_latest_checkpoint_is_skipped(data_dir, finished_run, tmp_path, damage, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    damage(workdir / "checkpoints" / "24")
    (workdir / "results.json").unlink()
    results = train.train_and_evaluate(tiny_config(data_dir), workdir)
    assert "Checkpoint 24" in caplog.text and "does not restore" in caplog.text
    assert results["resumed_from_step"] == 16
    # Steps 17..24 again from checkpoint 16: the run is deterministic, so nothing was lost.
    assert results["linear_eval"] == finished_run[1]["linear_eval"]
    assert results["final_train_loss"] == finished_run[1]["final_train_loss"]
    assert (workdir / checkpointing.UNREADABLE / "24").exists()  # kept for inspection


def tree_state(root: Path) -> dict:
    """Every path under `root` with its size and modification time: what a change would touch."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def run_evaluate(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdjax.evaluate", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_evaluate_falls_back_past_a_damaged_checkpoint_and_never_changes_the_run(
    finished_run, tmp_path
):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run[0], workdir)
    truncate_files(workdir / "checkpoints" / "24" / "state")
    before, results = tree_state(workdir), (workdir / "results.json").read_bytes()
    for path in [workdir, *workdir.rglob("*")]:  # read-only (root may still write: the tree
        path.chmod(path.stat().st_mode & ~0o222)  # comparison below holds for every user)
    try:  # no --output_dir: the results go to stdout only (test_train's test writes them)
        done = run_evaluate(f"--workdir={workdir}")
    finally:
        for path in [workdir, *workdir.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert tree_state(workdir) == before
    assert (workdir / "results.json").read_bytes() == results
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["evaluated_step"] == 16
    assert set(printed["linear_eval"]) == set(finished_run[1]["linear_eval"])
    assert "Checkpoint 24" in done.stderr and "does not restore" in done.stderr
    assert "Traceback" not in done.stderr
    # orbax's INFO chatter is filtered as the trainer filters it: no line from an orbax file.
    # (absl names a file by its base name: one that sdjax has too, registry.py, is sdjax's.)
    sdjax_files = {path.name for path in (REPO / "sdjax").rglob("*.py")}
    orbax_files = {path.name for path in Path(ocp.__file__).parent.rglob("*.py")} - sdjax_files
    chatter = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("I") and any(f" {name}:" in line for name in orbax_files)
    ]
    assert not chatter, chatter[:3]


@pytest.mark.slow
def test_evaluate_on_a_missing_workdir_is_one_line_and_creates_nothing(tmp_path):
    workdir = tmp_path / "nonexistent" / "run"
    done = run_evaluate(f"--workdir={workdir}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"Cannot evaluate: workdir {workdir} does not exist."
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "nonexistent").exists()
    done = run_evaluate(f"--workdir={tmp_path}", f"--output_dir={tmp_path / 'inside'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("Cannot evaluate: --output_dir")


@pytest.mark.slow
def test_non_finite_training_stops_and_never_checkpoints_non_finite_state(data_dir, tmp_path):
    # A finite learning rate so large that the parameters overflow within a few steps.
    config = tiny_config(data_dir, **{"optimizer.learning_rate": 1e38, "log_every_steps": 24})
    with pytest.raises(train.NonFiniteLoss, match="became non-finite") as error:
        train.train_and_evaluate(config, tmp_path)
    # The advice must be one that works: this workdir refuses a changed learning rate (it holds
    # the failed run's checkpoints), so the message sends the rerun to a new workdir.
    assert "optimizer.learning_rate" in str(error.value)
    assert f"start again in a new --workdir (this one, {tmp_path}, keeps" in str(error.value)
    with pytest.raises(config_lib.ConfigError, match="holds a run with another config"):
        train.train_and_evaluate(tiny_config(data_dir, **{"log_every_steps": 24}), tmp_path)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        for step in manager.all_steps():
            state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
            assert checkpointing.is_finite(state["state"]), f"checkpoint {step} is not finite"
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_checkpoints_to_keep": 0}, "max_checkpoints_to_keep: got 0, expected an int >= 1"),
        ({"log_every_steps": 0}, "config.log_every_steps: got 0, expected an int >= 1"),
        ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps: got -1, expected an int >= 0"),
        ({"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate: got nan"),
        ({"optimizer.learning_rate": float("inf")}, "config.optimizer.learning_rate: got inf"),
        ({"optimizer.learning_rate": -1e-3}, "config.optimizer.learning_rate: got -0.001"),
        ({"linear_eval.learning_rate": 0.0}, "config.linear_eval.learning_rate: got 0.0"),
        ({"dataset.train_examples": 32}, "batch_size: got 64, expected <= dataset.train_examples"),
        ({"model.encoder.name": "vit"}, "config.model.encoder.name: got 'vit', expected one of"),
    ],
)  # fmt: skip
def test_every_numeric_and_named_field_is_checked_before_data_loads(overrides, message):
    config = tiny_config("/nonexistent/not/read", **overrides)  # no data is touched
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(config, num_devices=8, num_processes=1)


def test_a_batch_larger_than_the_dataset_is_refused_before_data_loads():
    config = tiny_config("/nonexistent/not/read", batch_size=512)  # tiny mosaics: 256 examples
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config.batch_size: got 512, expected <= the 256 training examples",
    ):
        config_lib.check_config(config, num_devices=8, num_processes=1)


def test_the_declared_dataset_sizes_are_the_builders(data_dir):
    from sdjax.datasets import mosaic, yeast

    declared = {name: dataset.train_size for name, dataset in datasets.DATASETS.items()}
    # MNIST's and Fashion's; with a validation split (from other sources) training keeps them all.
    for builder_config in mosaic.MosaicBuilder.BUILDER_CONFIGS:
        variant = builder_config.name.removesuffix("with_validation").strip("_") or "default"
        suffix = "" if variant == "default" else f"_{variant}"
        for prefix in ("mnist_mosaic", "fashion_mosaic"):
            assert declared[prefix + suffix] == builder_config.num_train
    assert declared["yeast"] == yeast.NUM_TRAIN
    assert declared["debtags"] is None  # the machine's apt lists decide
    train_split, _ = datasets.load_train_and_test(tiny_config(data_dir).dataset)
    assert len(train_split["labels"]) == declared["mnist_mosaic_tiny"]


def test_a_batch_larger_than_data_of_unknown_size_leaves_no_half_made_workdir(
    data_dir, tmp_path, monkeypatch
):
    # A dataset whose size is known only once loaded (debtags's, from the machine's apt lists).
    unknown = dataclasses.replace(datasets.DATASETS["mnist_mosaic_tiny"], train_size=None)
    monkeypatch.setitem(datasets.DATASETS, "mnist_mosaic_tiny", unknown)
    workdir = tmp_path / "run"
    with pytest.raises(
        config_lib.ConfigError, match=r"config.batch_size: got 512, expected <= the 256"
    ):
        train.train_and_evaluate(tiny_config(data_dir, batch_size=512), workdir)
    assert not workdir.exists()
    workdir.mkdir()  # a workdir that was there stays, and as it was: empty
    with pytest.raises(config_lib.ConfigError):
        train.train_and_evaluate(tiny_config(data_dir, batch_size=512), workdir)
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.encoder.width": 0}, "config.model.encoder.width/in_channels/stem_stride: got 0/"),
        ({"model.encoder.stage_sizes": (0,)}, "config.model.encoder.stage_sizes: got (0,)"),
        ({"model.encoder.stage_sizes": ()}, "config.model.encoder.stage_sizes: got ()"),
        ({"model.encoder.stage_sizes": ("abc",)}, "config.model.encoder.stage_sizes: got ('abc',)"),
    ],
)  # fmt: skip
def test_model_fields_are_checked_with_the_config(overrides, message):
    config = tiny_config("/nonexistent/not/read", **overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(config, num_devices=8, num_processes=1)


# jax.distributed must start before the XLA backend, which this process has: a fresh one runs
# `sdjax.main.run` (the command after its flag parsing) on each config.
MULTIHOST_CASES = """
import sys
sys.path.insert(0, "tests")
from tiny_run import tiny_config
from sdjax import main
for fields in (
    {"multihost.num_processes": 2, "multihost.process_id": 0},
    {"multihost.enabled": True},
    {"multihost.coordinator_address": "localhost", "multihost.num_processes": 2},
):
    print("STATUS", main.run(tiny_config("/nonexistent/not/read", **fields), sys.argv[1]))
"""


@pytest.mark.slow
def test_multihost_fields_that_cannot_work_are_one_bad_config_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", MULTIHOST_CASES, str(tmp_path / "run")],
        cwd=REPO,
        env={k: v for k, v in clean_environment().items() if not k.startswith("SDJAX_")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.split() == ["STATUS", "2"] * 3, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("Bad config: ")]
    assert [line.split(";")[0] for line in lines] == [
        "Bad config: config.multihost.coordinator_address: got '' and no cluster was detected "
        "to provide it",
        "Bad config: config.multihost.enabled: got True, but no cluster (Cloud TPU, SLURM, ...) "
        "was detected to say where the processes meet",
        "Bad config: config.multihost.coordinator_address: got 'localhost', expected host:port "
        "(process 0's host and a free port, e.g. 10.0.0.1:1234).",
    ]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_misspelt_field_is_one_line_with_a_suggestion(data_dir, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=re.escape('did you mean "loss.positives"?')):
        tiny_config(data_dir, **{"loss.positvies": "any"})
    code, output = run_main(tmp_path, data_dir, "--config.loss.positvies=any")
    assert code == 2, output[-2000:]
    assert (
        'Bad config: --config.loss.positvies: no such field; did you mean "loss.positives"?'
        in output
    )
    assert "Traceback" not in output


@pytest.mark.slow
def test_a_field_or_config_file_that_does_not_exist_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(profile=''):\n    raise RuntimeError('no such setting')\n")

    def main_with(config):
        done = subprocess.run(
            [sys.executable, "-m", "sdjax.main", "--config", config, f"--workdir={workdir}"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
        )
        return done.returncode, done.stdout

    outputs = {
        "Bad config: --config.nosuchfield: no such field.": run_main(
            workdir, "/nonexistent/not/read", "--config.nosuchfield=1"
        ),
        "Bad config: --config: got 'configs/nope.py', no such config file.": main_with(
            "configs/nope.py"
        ),
        "Bad config: profile: got 'quick', expected one of ('', 'tiny').": main_with(
            "configs/yeast.py:quick"
        ),
        f"Bad config: --config: {str(broken)!r} does not load: RuntimeError: no such setting": (
            main_with(str(broken))
        ),
    }
    for message, (code, output) in outputs.items():
        assert code == 2, output[-2000:]
        assert output.strip().splitlines()[-1] == message, output[-2000:]
        assert "Traceback" not in output
    assert not workdir.exists()


def run_in_process(config, workdir, capsys) -> tuple[int, list[str]]:
    """`sdjax.main.run` (the command after its flags): (exit status, the lines it printed)."""
    from sdjax import main

    status = main.run(config, str(workdir))
    captured = capsys.readouterr()
    return status, (captured.out + captured.err).strip().splitlines()


def test_an_unwritable_workdir_is_one_line_before_data_loads(tmp_path, capsys):
    # Under /sys, which refuses new entries to every user, root included (chmod would not).
    workdir = Path("/sys") / f"sdjax_test_{os.getpid()}"
    status, lines = run_in_process(tiny_config("/nonexistent/not/read"), workdir, capsys)
    assert status == 2
    assert lines == [
        f"Cannot run: workdir {workdir} is not writable (PermissionError: "
        f"{os.strerror(1 if os.geteuid() == 0 else 13)}); pass another --workdir."
    ]


def test_missing_fashion_mnist_sources_are_one_line(tmp_path, capsys, monkeypatch):
    from sdjax.datasets import fashion_mosaic

    monkeypatch.setattr(fashion_mosaic, "DEBIAN_DIR", str(tmp_path / "no_debian_package"))
    config = config_lib.load_config_file("fashion_mosaic", "tiny")
    config.dataset.data_dir = str(tmp_path / "tfds")
    status, lines = run_in_process(config, tmp_path / "run", capsys)
    assert status == 2  # the last line (tfds prints its progress before it fails)
    assert lines[-1].startswith("Cannot run: Fashion-MNIST source files not found"), lines[-3:]
    assert "apt-get install dataset-fashion-mnist" in lines[-1]
    assert not (tmp_path / "run").exists()  # left as it was


# `python -m sdjax.main` whose training batches remove (move away) or replace checkpoints/ at one
# step: a
# step right after a save returned (its files are still being written in orbax's threads), or
# one when that save may be done.
REMOVING_MAIN = """
import sys
from pathlib import Path
from sdjax import input_pipeline, main
step_to_act, action = int(sys.argv.pop(1)), sys.argv.pop(1)
checkpoints = Path(sys.argv[2].removeprefix("--workdir=")) / "checkpoints"
original = input_pipeline.training_batches

def training_batches(config, split):
    batches = original(config, split)
    read = batches.host_batch

    def host_batch(step):
        if step == step_to_act:  # moved away at once, while orbax may be writing into it
            checkpoints.rename(checkpoints.with_name("moved_away"))
            if action == "replace":
                checkpoints.write_text("not a directory")
        return read(step)

    batches.host_batch = host_batch
    return batches

input_pipeline.training_batches = training_batches
main.app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.slow
@pytest.mark.parametrize("step, action", [(8, "remove"), (10, "replace")])
def test_checkpoints_removed_mid_run_end_in_one_line_with_status_1(
    data_dir, tmp_path, step, action
):
    workdir = tmp_path / "run"
    command = [sys.executable, "-c", REMOVING_MAIN, str(step), action]
    command += [f"--config={REPO / 'configs' / 'default.py'}:tiny", f"--workdir={workdir}"]
    command += [f"--config.dataset.data_dir={data_dir}"]
    # (orbax's threads, waiting for directories that were never made, held the exit 5 minutes)
    ended = subprocess.run(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240
    )
    output = ended.stdout
    assert ended.returncode == 1, output[-3000:]
    lines = output.strip().splitlines()
    assert lines[-1].startswith(
        f"Training failed: writing checkpoints into {workdir / 'checkpoints'} failed by step "
    ), lines[-5:]
    assert "Traceback" not in output and not re.search(r"^E\d{4} ", output, re.M), output[-3000:]
    assert [line for line in lines if "Training failed" in line] == [lines[-1]]


def test_held_background_errors_are_passed_on_unless_the_failure_is_reported(caplog, monkeypatch):
    def orbax_error():  # as orbax's threads log a failed write
        record = {"name": "absl", "levelno": 40, "levelname": "ERROR", "msg": "write failed"}
        logging.getLogger("absl").handle(
            logging.makeLogRecord(record | {"pathname": "/site-packages/orbax/checkpoint/x.py"})
        )

    reported: list = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    with checkpointing.background_errors_held(reported_as=KeyError):
        orbax_error()
        sys.unraisablehook("Event loop is closed")  # as tensorstore reports a write in flight
        assert caplog.messages == [] and reported == []
    assert caplog.messages == ["write failed"] and reported == ["Event loop is closed"]
    with pytest.raises(KeyError), checkpointing.background_errors_held(reported_as=KeyError):
        orbax_error()
        sys.unraisablehook("Event loop is closed")
        raise KeyError("the failure, reported in one line")
    assert caplog.messages == ["write failed"] and reported == ["Event loop is closed"]
    assert sys.unraisablehook == reported.append


def test_after_a_reported_write_failure_tasks_collected_later_report_nothing(caplog, monkeypatch):
    """The failed write's asyncio tasks can be collected after the one line, at exit (it
    happened under load): asyncio then logs "Task exception was never retrieved"."""

    def collect_a_failed_task():
        async def write_fragment():
            raise ValueError("NOT_FOUND: Error writing")

        loop = asyncio.new_event_loop()
        task = loop.create_task(write_fragment())
        loop.run_until_complete(asyncio.wait([task]))  # done; its exception never retrieved
        loop.close()
        del task
        gc.collect()

    def collect_a_coroutine_never_awaited():
        async def write_fragment():
            pass

        write_fragment()  # created, never awaited: collected at once
        gc.collect()

    reported: list = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])  # restored afterwards
    collect_a_failed_task()
    assert any("Task exception was never retrieved" in m for m in caplog.messages)
    with warnings.catch_warnings(record=True) as warned:  # the filters restored afterwards
        warnings.simplefilter("always")
        collect_a_coroutine_never_awaited()
        assert any("was never awaited" in str(w.message) for w in warned)
        warned.clear()
        caplog.clear()
        checkpointing.drop_background_reports()
        collect_a_failed_task()
        collect_a_coroutine_never_awaited()
    sys.unraisablehook("Event loop is closed")
    assert caplog.messages == [] and reported == [] and warned == []


def test_the_summary_prints_counts_as_ints_and_a_logdir_a_shell_can_take(tmp_path):
    from sdjax import main

    workdir = str(tmp_path / "a run")
    text = main.summary({"linear_eval": {"mAP": 0.5, "num_scored_classes": 10.0}}, workdir)
    assert "linear_eval: mAP=0.5000, num_scored_classes=10\n" in text + "\n"
    command = re.search(r"\(tensorboard --logdir (.*)\)", text).group(1)
    assert shlex.split(command) == [workdir]


def test_multihost_settings_come_from_config_fields_or_the_environment(monkeypatch):
    config = tiny_config("")
    assert multihost.settings(config)["enabled"] is False
    monkeypatch.setenv("SDJAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("SDJAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("SDJAX_PROCESS_ID", "2")
    monkeypatch.setenv("SDJAX_INITIALIZATION_TIMEOUT_S", "30")
    assert multihost.settings(config) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 2,
        "initialization_timeout_s": 30,
        "enabled": True,
    }
    # A field that is set wins over the environment.
    config_lib.override(config, **{"multihost.process_id": 0, "multihost.num_processes": 2})
    assert multihost.settings(config)["process_id"] == 0
    config_lib.override(config, **{"multihost.process_id": 5})
    with pytest.raises(
        config_lib.ConfigError, match=r"multihost\.process_id: got 5, expected 0\.\.1"
    ):
        multihost.settings(config)


@pytest.mark.slow
def test_a_peer_that_never_starts_is_a_clear_error_within_the_timeout(data_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # process 0 never starts
    env = clean_environment(
        SDJAX_COORDINATOR_ADDRESS=address,
        SDJAX_NUM_PROCESSES=2,
        SDJAX_PROCESS_ID=1,
        SDJAX_INITIALIZATION_TIMEOUT_S=3,
    )
    start = time.time()
    process = subprocess.run(
        [sys.executable, str(WORKER), "2", data_dir, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 3 s of waiting after an import of jax and sdjax (a few seconds on a loaded 2-core CI).
    assert time.time() - start < 60
    assert process.returncode == 3, process.stdout[-2000:] + process.stderr[-2000:]
    assert f"did not meet all peers at coordinator {address} within 3 s" in process.stderr


@pytest.mark.slow
def test_sigterm_while_data_is_prepared_is_honoured_at_once(tmp_path):
    # An empty data dir: the run builds the dataset first (seconds), and SIGTERM arrives then,
    # as soon as the run holds its workdir (just before it loads data).
    workdir = tmp_path / "run"
    # The run ends inside the dataset build, before tfds's temporary folder is removed.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    environment = clean_environment(TMPDIR=scratch)
    process = run_main(workdir, str(tmp_path / "tfds"), wait=False, env=environment)
    deadline = time.time() + 240
    while not (workdir / ".lock.process0").exists() and time.time() < deadline:
        assert process.poll() is None, process.stdout.read()[-3000:]
        time.sleep(0.02)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    code, seconds = process.returncode, time.time() - signalled
    assert code == 0, output[-3000:]
    assert "SIGTERM before the first training step: stopped" in output
    assert seconds < 20, seconds  # the dataset build alone takes longer on a 2-core machine
    assert not (workdir / "checkpoints").exists()


# Two hosts may sum across processes in another order than one host does: float32 ulps. The
# tiny config's learning rate (1e-2) amplifies such differences about 2x per step (measured:
# 1 ulp at step 12, 3e-4 by step 24); at 1e-3 they stay at the ulp level (measured: identical
# results at 12 steps), which the tolerances below leave a wide margin over. 32 steps with
# checkpoints every 4 leave room for SIGTERM: the preemption sync point can come ~10 steps later.
MULTIHOST_RUN = (
    "--config.num_train_steps=32",
    "--config.checkpoint_every_steps=4",
    "--config.optimizer.learning_rate=1e-3",
    "--config.evals.save_test_outputs=True",
    "--config.evals.random_init_probe=False",
)


@pytest.fixture(scope="module")
def two_host_run(data_dir, tmp_path_factory):
    """The tiny run as 2 processes x 2 CPU devices, uninterrupted: (workdir, results per host)."""
    workdir = tmp_path_factory.mktemp("two_hosts")
    processes = start_two_hosts(WORKER, 2, data_dir, workdir, *MULTIHOST_RUN, cwd=REPO)
    return workdir, [results_line(output) for output in wait_for_all(processes)]


def results_line(output: str) -> dict:
    line = next((x for x in output.splitlines() if x.startswith("RESULTS ")), None)
    assert line, output[-3000:]
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.slow
def test_two_hosts_train_like_one_host_with_as_many_devices(data_dir, two_host_run, tmp_path):
    """2 processes x 2 devices against 1 process x 4 devices: the same shards, the same programs.

    Only the cross-process sums (gloo instead of in-process) may add in another order, which
    moves results by float32 ulps (1.2e-7 relative): losses are compared at rtol 1e-5. The mAP
    ranks scores, so one ulp can swap two of them; the probe's inputs and outputs are compared
    instead, as stored in float16 (rtol 2e-3, about two float16 ulps).
    """
    single = subprocess.run(
        [sys.executable, str(WORKER), "4", data_dir, str(tmp_path), *MULTIHOST_RUN],
        cwd=REPO,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    single_host = results_line(single.stdout + single.stderr)
    workdir, two_host_results = two_host_run
    assert single_host["num_processes"] == 1 and single_host["num_devices"] == 4
    for results in two_host_results:
        assert results["num_processes"] == 2 and results["num_devices"] == 4
        for key in ("final_train_loss", "heldout_stage1_loss"):
            np.testing.assert_allclose(leaves(results[key]), leaves(single_host[key]), rtol=1e-5)
    two_hosts, one_host = (
        np.load(workdir / "test_outputs.npz"),
        np.load(tmp_path / "test_outputs.npz"),
    )
    for key in ("features", "scores"):
        np.testing.assert_allclose(
            two_hosts[key].astype(np.float32),
            one_host[key].astype(np.float32),
            rtol=2e-3,
            atol=1e-3,
        )


def leaves(value) -> list[float]:
    return list(value.values()) if isinstance(value, dict) else [value]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step(data_dir, two_host_run, tmp_path):
    processes = start_two_hosts(WORKER, 2, data_dir, tmp_path, *MULTIHOST_RUN, cwd=REPO)
    deadline = time.time() + 240
    while not (tmp_path / "checkpoints" / "4").exists() and time.time() < deadline:
        assert all(p.poll() is None for p in processes), "a process ended before checkpoint 4"
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # host 1 only
    outputs = wait_for_all(processes, timeout=120)
    stops = [
        re.search(r"PREEMPTED SIGTERM: saved the checkpoint at step (\d+)", o) for o in outputs
    ]
    assert all(stops), [o[-2000:] for o in outputs]
    assert stops[0].group(1) == stops[1].group(1)  # orbax's preemption sync point
    resumed_processes = start_two_hosts(WORKER, 2, data_dir, tmp_path, *MULTIHOST_RUN, cwd=REPO)
    resumed = [results_line(output) for output in wait_for_all(resumed_processes)]
    # The same process layout runs the same programs and collectives: identical results.
    for results, straight in zip(resumed, two_host_run[1], strict=True):
        assert results["resumed_from_step"] == int(stops[0].group(1)) < 32
        assert results["linear_eval"] == straight["linear_eval"]
        assert results["final_train_loss"] == straight["final_train_loss"]


# --------------------------------------------------------------------------------------------
# Data sources and the experiment runner
# --------------------------------------------------------------------------------------------

# The archives tfds builds each dataset from, written out here rather than read from the module.
TFDS_SOURCES = {
    "voc2007": ("voc/2007", ["VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"]),
    "coco2017": (
        "coco/2017",
        [
            "train2017.zip",
            "val2017.zip",
            "test2017.zip",
            "annotations_trainval2017.zip",
            "image_info_test2017.zip",
        ],
    ),
}


@contextlib.contextmanager
def deadline(seconds):
    """Raises TimeoutError in the block after `seconds`, so a hanging call fails the test."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine: every host name fails to resolve, as it does offline."""

    def no_resolution(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_resolution)


@pytest.mark.parametrize("name", sorted(TFDS_SOURCES))
def test_tfds_dataset_without_network_fails_at_once_saying_what_to_download_where(
    name, tmp_path, offline
):
    tfds_name, filenames = TFDS_SOURCES[name]
    infos = tfds.builder_cls(tfds_name.split("/")[0]).url_infos
    urls = {info.filename: url for url, info in infos.items()}
    data_dir = tmp_path / "tfds"  # empty: nothing prepared, nothing downloaded
    manual_dir = data_dir / "downloads" / "manual"
    # Then a file put in tfds's manual dir is no longer asked for.
    for already_there in ([], filenames[:1]):
        for filename in already_there:
            manual_dir.mkdir(parents=True, exist_ok=True)
            (manual_dir / filename).write_bytes(b"")
        start = time.monotonic()
        # tfds alone retries for minutes; the deadline turns that into a failure.
        with deadline(60), pytest.raises(FileNotFoundError) as raised:
            datasets.load_split(name, "train", data_dir=str(data_dir), image_size=32)
        # One failed name lookup, plus making tfds's builder (its imports take seconds on a busy
        # 2-core machine); tfds alone fails after 3.5 minutes of retries here.
        assert time.monotonic() - start < 20
        message = str(raised.value)
        assert str(manual_dir) in message and "config.dataset.data_dir" in message
        for filename in filenames:
            assert (urls[filename] in message) == (filename not in already_there), filename


@pytest.mark.parametrize("name", sorted(TFDS_SOURCES))
def test_missing_voc_or_coco_sources_are_one_line(name, tmp_path, capsys, offline):
    config = config_lib.load_config_file(name, "tiny")
    config.dataset.data_dir = str(tmp_path / "tfds")
    with deadline(60):
        status, lines = run_in_process(config, tmp_path / "run", capsys)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"Cannot run: {name}: tfds "), lines
    assert str(tmp_path / "tfds" / "downloads" / "manual") in lines[0]
    for filename in TFDS_SOURCES[name][1]:
        assert filename in lines[0]


EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# Runs the suite's runner with `execute` (the training of one run) replaced by a fake result.
RUN_WITH_FAKE_TRAINING = """
import sys
from absl import app
sys.path.insert(1, sys.argv.pop(1))  # tests/, after the working directory (the copy's parent)
from experiments import run_experiments
from test_experiments import fake_record, write

def execute(profile, run, results_dir, workdir_root, data_dir):
    write(results_dir, run, 0.5)
    return {**fake_record(run, 0.5), "wall_seconds": 0.0}

run_experiments.execute = execute
run_experiments.define_flags()
app.run(run_experiments.main)
"""


def experiments_copy(tmp_path) -> Path:
    """The experiments package with its README and the committed quick report, to run the entry
    points in (from its parent): what they write next to themselves lands in the copy, never in
    the checkout."""
    copy = tmp_path / "experiments"
    (copy / "results" / "quick").mkdir(parents=True)
    for path in [*EXPERIMENTS.glob("*.py"), EXPERIMENTS / "README.md"]:
        shutil.copy(path, copy)
    shutil.copy(EXPERIMENTS / "results" / "quick" / "report.md", copy / "results" / "quick")
    return copy


def run_entry_point(copy, name, *args, fake_training=False):
    if fake_training:
        command = ["-c", RUN_WITH_FAKE_TRAINING, str(Path(__file__).parent)]
    else:
        command = ["-m", f"experiments.{name}"]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        cwd=copy.parent,
        env={**os.environ, "PYTHONPATH": str(EXPERIMENTS.parent)},
        timeout=300,
    )


def write_fake_profile(results_dir, profile="quick", skip=()):
    """A result file for every run of `profile` but `skip`; the second pass adds the temperature
    sweep of the baseline that the comparison picked."""
    for _ in range(2):
        for run in suite.plan(profile, results_dir, []):
            if run not in skip:
                write(results_dir, run, 0.5)


@pytest.mark.slow
def test_runner_on_a_subset_writes_no_report_and_leaves_tracked_files_alone(tmp_path):
    copy = experiments_copy(tmp_path)
    tracked = [copy / "README.md", copy / "results" / "quick" / "report.md"]
    before = [path.read_bytes() for path in tracked]
    custom = tmp_path / "custom"
    for results_dir in (custom, copy / "results"):  # a custom directory, then the committed one
        done = run_entry_point(
            copy,
            "run_experiments",
            "--profile=quick",
            f"--results_dir={results_dir}",
            f"--workdir={tmp_path / 'work'}",
            "--datasets=yeast",
            "--sections=comparison",
            fake_training=True,
        )
        assert done.returncode == 0, done.stderr
        assert [path.read_bytes() for path in tracked] == before
        # 7 losses (pretrain, joint) or 6 (moco: its BCE is pretrain's) x 3 seeds
        assert "60 runs planned, 60 to do." in done.stdout
        assert "incomplete: 111 of 171 runs have no result file" in done.stdout
        assert len(list((results_dir / "quick" / "runs").rglob("*.json"))) == 60
    assert sorted(p.name for p in (custom / "quick").iterdir()) == ["runs"]
    assert sorted(p.name for p in (copy / "results" / "quick").iterdir()) == ["report.md", "runs"]


@pytest.mark.slow
def test_runner_finishing_a_profile_reports_into_its_own_results_dir(tmp_path):
    copy = experiments_copy(tmp_path)
    readme = (copy / "README.md").read_bytes()
    custom = tmp_path / "custom"
    write_fake_profile(custom / "quick", skip={suite.Run("yeast", "sd", 0)})
    done = run_entry_point(
        copy,
        "run_experiments",
        "--profile=quick",
        f"--results_dir={custom}",
        f"--workdir={tmp_path / 'work'}",
        fake_training=True,
    )
    assert done.returncode == 0, done.stderr
    assert "171 runs planned, 1 to do." in done.stdout
    report = (custom / "quick" / "report.md").read_text()
    assert report.startswith(
        "## Appendix: results of the `quick` profile (tuned on test)\n\n171 finished runs, 0.10 h"
    )
    assert (copy / "README.md").read_bytes() == readme


@pytest.mark.slow
def test_report_command_needs_a_complete_profile_and_the_committed_dir_for_the_readme(tmp_path):
    copy = experiments_copy(tmp_path)
    readme = (copy / "README.md").read_text()
    committed_report = (copy / "results" / "quick" / "report.md").read_text()
    missing = suite.Run("yeast", "sd", 0)
    write_fake_profile(copy / "results" / "quick", skip={missing})
    done = run_entry_point(copy, "experiment_report", "--profiles=quick")
    assert done.returncode == 1
    assert "incomplete: 1 of 171 runs have no result file (e.g. yeast/sd_t0.1_s0)" in done.stderr
    assert (copy / "README.md").read_text() == readme
    assert (copy / "results" / "quick" / "report.md").read_text() == committed_report

    custom = tmp_path / "custom"
    write_fake_profile(custom / "quick")
    done = run_entry_point(copy, "experiment_report", "--profiles=quick", f"--results_dir={custom}")
    assert done.returncode == 0, done.stderr
    assert (
        (custom / "quick" / "report.md")
        .read_text()
        .startswith("## Appendix: results of the `quick`")
    )
    assert (copy / "README.md").read_text() == readme
    # Without --profiles: every profile that has result files there, and only those.
    done = run_entry_point(copy, "experiment_report", f"--results_dir={custom}")
    assert done.returncode == 0, done.stderr
    written = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert written == [f"wrote {custom.resolve() / 'quick' / 'report.md'}"]

    write(copy / "results" / "quick", missing, 0.5)
    done = run_entry_point(copy, "experiment_report", "--profiles=quick")
    assert done.returncode == 0, done.stderr
    report = (copy / "results" / "quick" / "report.md").read_text()
    assert report != committed_report and "171 finished runs" in report
    begin, end = "<!-- report:quick:begin -->\n", "\n<!-- report:quick:end -->"
    head, rest = readme.split(begin)
    tail = rest.split(end)[1]
    written = (copy / "README.md").read_text()
    assert written.startswith(head + begin) and written.endswith(end + tail)
    block = written.removeprefix(head + begin).removesuffix(end + tail)
    # report.md lies in results/quick/ itself, so its links lack the README's prefix.
    assert block.replace("(results/quick/", "(") == report[:-1]


@pytest.mark.slow
def test_dry_run_lists_finished_runs_as_done(tmp_path):
    copy = experiments_copy(tmp_path)
    results_dir = tmp_path / "results"
    finished = [suite.Run("yeast", "sd", seed) for seed in suite.profile_seeds("quick")]
    for run in finished:
        write(results_dir / "quick", run, 0.5)
    files = sorted(results_dir.rglob("*"))
    done = run_entry_point(
        copy,
        "run_experiments",
        "--profile=quick",
        f"--results_dir={results_dir}",
        f"--workdir={tmp_path / 'work'}",
        "--datasets=yeast",
        "--dry_run",
    )
    assert done.returncode == 0, done.stderr
    planned = suite.plan("quick", results_dir / "quick", [], ["yeast"])
    assert done.stdout.splitlines() == [
        f"{len(planned)} runs planned, {len(planned) - len(finished)} to do.",
        *(f"{'done' if r in finished else 'to do':6} {r.name}" for r in planned),
    ]
    assert sorted(results_dir.rglob("*")) == files  # a dry run writes nothing


# --------------------------------------------------------------------------------------------
# Loss edge inputs
# --------------------------------------------------------------------------------------------


def loss_case(seed=0, num_samples=6, num_views=2, dim=4, num_classes=4):
    """A batch in which every sample has a label, so every anchor has a positive."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, num_views, dim)).astype(np.float32)
    labels = (rng.random((num_samples, num_classes)) < 0.5).astype(np.float32)
    labels[np.arange(num_samples), rng.integers(0, num_classes, num_samples)] = 1.0
    return features, labels


def test_zero_samples_is_a_value_error_naming_features():
    with pytest.raises(ValueError, match=r"`features`: got shape \(0, 3\)"):
        losses.multilabel_supcon_loss(np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32))


@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_huge_feature_norms_are_normalised_like_unit_ones(positives):
    features, labels = loss_case(1)
    features = np.clip(features, -3, 3)  # so that 1e38 * x stays below float32's 3.4e38
    scales = np.logspace(20, 38, num=features.shape[0] * 2).reshape((*features.shape[:2], 1))
    huge = (features * scales).astype(np.float32)
    assert np.all(np.isfinite(huge)) and np.all(np.abs(huge).max(axis=-1) >= 1e20)
    want = losses.multilabel_supcon_loss(features, labels, positives=positives)
    got = losses.multilabel_supcon_loss(huge, labels, positives=positives)
    # The unit directions agree to float32 rounding (~1e-7); logits / 0.07 amplify that ~15x.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(want) > 0


def test_a_float_sample_mask_is_a_type_error_naming_sample_mask():
    features, labels = loss_case(2)
    with pytest.raises(TypeError, match=r"`sample_mask`: got dtype float32, expected bool"):
        losses.multilabel_supcon_loss(features, labels, sample_mask=np.full(6, 0.5, np.float32))


@pytest.mark.parametrize("temperature", [True, "0.1"])
def test_a_bool_or_string_temperature_is_a_type_error_naming_temperature(temperature):
    features, labels = loss_case(3)
    with pytest.raises(TypeError, match=r"`temperature`: got (bool True|str '0.1')"):
        losses.multilabel_supcon_loss(features, labels, temperature=temperature)


def test_block_size_accepts_numpy_integers():
    features, labels = loss_case(4, num_samples=12)
    got = losses.multilabel_supcon_loss(features, labels, block_size=np.int64(5))
    np.testing.assert_allclose(got, oracle(features, labels)[0], rtol=2e-5)


def test_python_lists_are_accepted_as_arrays():
    features, labels = loss_case(5, num_views=1)
    got = losses.multilabel_supcon_loss(features[:, 0].tolist(), labels.astype(int).tolist())
    np.testing.assert_allclose(got, oracle(features, labels)[0], rtol=2e-5)


@pytest.mark.parametrize("block_size", [None, 4])
def test_axis_name_outside_a_mapped_context_is_an_error_naming_axis_name(block_size):
    features, labels = loss_case(6)
    with pytest.raises(ValueError, match="`axis_name`: got 'data', which is not a mapped axis"):
        losses.multilabel_supcon_loss(features, labels, axis_name="data", block_size=block_size)


@pytest.mark.slow
@pytest.mark.parametrize("positives", losses.POSITIVES)
def test_float64_inputs_compute_in_float64_under_x64(positives):
    features, labels = loss_case(7)
    rng = np.random.default_rng(7)
    # Weights that float32 cannot hold exactly: float32 label algebra would be off by ~1e-8.
    label_weights = rng.uniform(0.5, 2.0, labels.shape[1])
    kwargs = dict(positives=positives, temperature=0.3, jaccard_threshold=0.3)
    with jax.enable_x64(True):
        features64 = jnp.asarray(features, jnp.float64) + 1e-9  # off the float32 grid too
        value, grad = jax.value_and_grad(
            lambda f: losses.multilabel_supcon_loss(
                f, labels, label_weights=jnp.asarray(label_weights), **kwargs
            )
        )(features64)
        assert value.dtype == jnp.float64 and grad.dtype == jnp.float64
        want = oracle(np.asarray(features64), labels, label_weights=label_weights, **kwargs)[0]
        # float64 rounding (1e-16) through O(100) terms and a log-sum-exp stays below 1e-12.
        np.testing.assert_allclose(float(value), want, rtol=1e-12)
        for low in (jnp.bfloat16, jnp.float16, jnp.float32):  # float32 stays the floor
            assert losses.multilabel_supcon_loss(features.astype(low), labels).dtype == jnp.float32
    assert float(want) > 0


# Issue 28: ids, temperatures and lists that used to pass silently or without the argument's name


@pytest.mark.parametrize("bad_id", [7, 4, -2])
def test_labels_from_indices_refuses_an_out_of_range_id_it_can_see(bad_id):
    with pytest.raises(
        ValueError, match=rf"`label_indices`: got {bad_id} at index \(0, 1\), expected class ids"
    ):
        losses.labels_from_indices(np.array([[0, bad_id, -1]]), 4)


def test_labels_from_indices_under_jit_turns_an_out_of_range_row_into_nan_not_a_dropped_id():
    indices = jnp.array([[0, 7, -1], [2, -1, -1], [1, -2, 3]])
    got = np.asarray(jax.jit(losses.labels_from_indices, static_argnums=1)(indices, 4))
    assert np.isnan(got[0]).all() and np.isnan(got[2]).all()
    np.testing.assert_array_equal(got[1], [0, 0, 1, 0])
    # validate_inputs, the eager value check, names the row the jitted conversion poisoned.
    with pytest.raises(ValueError, match=re.escape("`labels`: got nan at index (0, 0)")):
        losses.validate_inputs(np.ones((3, 2), np.float32), got)


def test_labels_from_indices_takes_numpy_ints_and_refuses_float_ids_with_a_type_error():
    indices = np.array([[0, 2], [1, -1]])
    np.testing.assert_array_equal(
        losses.labels_from_indices(indices, np.int64(3)), [[1, 0, 1], [0, 1, 0]]
    )
    with pytest.raises(TypeError, match=r"`label_indices`: got dtype float32, expected integer"):
        losses.labels_from_indices(indices.astype(np.float32), 3)
    with pytest.raises(TypeError, match=r"`num_classes`: got float 3.0, expected an int >= 1"):
        losses.labels_from_indices(indices, 3.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_validate_inputs_checks_the_value_a_traced_temperature_will_have(temperature):
    features, labels = loss_case(8)
    tau = jnp.float32(temperature)
    with pytest.raises(ValueError, match=r"`temperature`: got .*, expected a finite number > 0"):
        losses.validate_inputs(features, labels, temperature=tau)
    losses.validate_inputs(features, labels, temperature=jnp.float32(0.1))


def test_a_0d_int_temperature_array_is_a_type_error():
    features, labels = loss_case(9)
    with pytest.raises(
        TypeError, match=r"`temperature`: got an array of shape \(\) and dtype int32"
    ):
        losses.multilabel_supcon_loss(features, labels, temperature=np.array(1, np.int32))
    with pytest.raises(
        TypeError, match=r"`temperature`: got an array of shape \(\) and dtype int32"
    ):
        losses.validate_inputs(features, labels, temperature=jnp.array(1, jnp.int32))


@pytest.mark.parametrize("argument", ["features", "labels"])
def test_a_ragged_nested_list_is_an_error_naming_the_argument(argument):
    features, labels = loss_case(10, num_views=1)
    arguments = {"features": features[:, 0].tolist(), "labels": labels.tolist()}
    arguments[argument][1] = arguments[argument][1][:-1]  # one row shorter than the others
    for check in (losses.multilabel_supcon_loss, losses.validate_inputs):
        with pytest.raises(ValueError, match=rf"`{argument}`: got a ragged nested list"):
            check(**arguments)


def test_the_spec_says_what_the_code_does_about_temperature_errors_and_norms():
    spec = (REPO / "docs" / "SPEC.md").read_text()
    inputs = spec[spec.index("- **`temperature`.**") :]
    temperature = inputs[: inputs.index("\n- **", 1)]
    assert "traced" in temperature and "validate_inputs" in temperature, temperature
    assert "static" not in temperature, temperature
    errors = inputs[inputs.index("- **Trace-time errors.**") : inputs.index("- **Value checks.**")]
    assert "`TypeError`" in errors and "dtype kinds" in errors.split("`TypeError`")[1], errors
    # The huge-norm test above goes to 1e38, as the README says; the spec must not say less.
    assert "feature norms from 0 to 10³⁸" in spec and "10⁴" not in spec


def test_the_readme_exit_status_table_matches_the_commands():
    """The statuses are tested where they arise (Bad config, Cannot run, Training failed, the
    missing peer); this ties the README's table and main.py's docstring to the code that prints
    each line and returns its status."""
    from sdjax import main

    rows = dict(re.findall(r"^ *\| (\d) \| .* \| (.*) \|$", (REPO / "README.md").read_text(), re.M))
    docstring = {int(n) for n in re.findall(r"^  (\d)  ", main.__doc__, re.M)}
    assert {int(status) for status in rows} == docstring == {0, 1, 2, 3}
    source = Path(main.__file__).read_text()
    for status, prefix in [("2", "Bad config"), ("2", "Cannot run"), ("1", "Training failed")]:
        assert f"`{prefix}: ...`" in rows[status]
        assert re.search(rf'print\(f"{prefix}: .*\n +return {status}\n', source), prefix
    assert "`Multi-host start failed: ...`" in rows["3"]
    multihost_source = Path(multihost.__file__).read_text()
    assert re.search(r'f"Multi-host start failed: [^)]*\)\n\s+os\._exit\(3\)', multihost_source)
