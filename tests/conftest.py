"""Every test process sees 8 fake CPU devices, so the cross-device tests can run."""

import os

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """The trainer processes that tests start share one JAX compilation cache for the test run.

    Most of a tiny run's start-up is compiling programs that the previous run compiled too. Only
    child processes see it: this process read its JAX settings at import.
    """
    base = tmp_path_factory.getbasetemp()
    run_root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(run_root / "jax_cache"))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
        yield


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
