"""The tiny trainer run the trainer tests share: its config, its command line, its checkpoints."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdjax import config_lib

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
    """configs/default.py:tiny reading the tests' prepared data, with dotted overrides."""
    config = config_lib.load_config_file("default", "tiny")
    config.dataset.data_dir = data_dir
    return config_lib.override(config, **overrides)


def run_main(workdir, data_dir, *extra, wait=True, env=None):
    """`python -m sdjax.main` on the tiny config: (exit code, output), or the running process."""
    command = [
        sys.executable,
        "-m",
        "sdjax.main",
        f"--config={REPO / 'configs' / 'default.py'}:tiny",
        f"--workdir={workdir}",
        f"--config.dataset.data_dir={data_dir}",
        *extra,
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if wait:
        output = process.communicate(timeout=300)[0]
        return process.returncode, output
    return process


def wait_for_checkpoint(workdir, step, process, timeout=240):
    """Waits until checkpoint `step` exists; fails the test if the run ends first."""
    deadline = time.time() + timeout
    target = Path(workdir) / "checkpoints" / str(step)
    while not target.exists():
        if process.poll() is not None:
            pytest.fail(f"run ended before checkpoint {step}: {process.stdout.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint {step} after {timeout} s")
        time.sleep(0.05)
