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
