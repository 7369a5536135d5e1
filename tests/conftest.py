"""Every test process sees 8 fake CPU devices, so the cross-device tests can run."""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A tfds data dir holding the tiny MNIST mosaics, built once per test process."""
    from sdjax import input_pipeline

    path = tmp_path_factory.mktemp("tfds")
    input_pipeline.load_split("mnist_mosaic_tiny", "train", data_dir=str(path))
    return str(path)
