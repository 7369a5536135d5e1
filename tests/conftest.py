"""Every test process sees 8 fake CPU devices, so the cross-device tests can run."""

import importlib.util
import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

# One JAX compilation cache for every test run on this machine, kept between runs as pip's
# cache is, and shared by the pytest processes (xdist's workers) and the processes tests start
# (trainers, the docs build, the device kit's rehearsal): most of a tiny run is compiling
# programs that an earlier one compiled. JAX keys an entry by the program, jax's version, its
# flags and the devices, so a hit is exactly what this code would compile. The pytest
# processes keep it under CACHE_MAX_BYTES, least recently used out (JAX needs `filelock` for
# that; the core wheel's test venvs lack it, and only read and add). This process has imported
# jax already, so it takes JAX's variables through jax.config too, before compiling anything.
# A run that compiles everything: `SDJAX_TESTS_JAX_CACHE=$(mktemp -d) make test`.
_CACHE_VARIABLE = "SDJAX_TESTS_JAX_CACHE"
CACHE_MAX_BYTES = 4 * 2**30
_cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
os.environ.setdefault(_CACHE_VARIABLE, str(_cache_home / "sdjax" / "tests-jax-cache"))
Path(os.environ[_CACHE_VARIABLE]).mkdir(parents=True, exist_ok=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VARIABLE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.1"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
if importlib.util.find_spec("filelock") is not None:
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data dir holding the tiny MNIST mosaics, built once per test process."""
    from sdjax import datasets

    path = tmp_path_factory.mktemp("tfds")
    datasets.load_split("mnist_mosaic_tiny", "train", data_dir=str(path))
    return str(path)


@pytest.fixture(scope="session")
def finished_run(data_dir, tmp_path_factory):
    """A finished run of configs/default.py:tiny, shared by the tests of a process: (its workdir,
    with checkpoints 8, 16 and 24; its results). A test that changes the workdir copies it."""
    from tiny_run import tiny_config

    from sdjax import train

    workdir = tmp_path_factory.mktemp("finished_run")
    return workdir, train.train_and_evaluate(tiny_config(data_dir), workdir)


# The test files by the CPU time they take, longest first (a file not listed goes last).
# `make test` hands whole files to its 2 workers in this order, each to the first one free, so
# that the long files start first and the run ends on short ones. Only the order depends on it.
LONGEST_FIRST = [
    "test_faults.py",
    "test_packaging.py",
    "test_device_kit.py",
    "test_docs_site.py",
    "test_train.py",
    "test_moco_joint.py",
    "test_protocol.py",
    "test_experiments.py",
    "test_datasets.py",
    "test_without_tensorflow.py",
    "test_distributed.py",
    "test_tfds_multilabel.py",
    "test_losses.py",
    "test_models.py",
    "test_query_key.py",
    "test_gradient_cache.py",
    "test_streaming.py",
    "test_evaluation.py",
    "test_conv.py",
    "test_docs.py",
    "test_data.py",
    "test_imports.py",
]


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
