"""A seconds-long run of the whole trainer, for tests and smoke checks.

COMMAND:
  python -m sdjax.main --config configs/tiny.py --workdir /tmp/sdjax_tiny
"""

from sdjax import config_lib


def get_config():
    config = config_lib.load_config_file("default")
    config.dataset.name = "mnist_mosaic_tiny"
    config.model.encoder.stage_sizes = (1,)
    config.model.encoder.width = 8
    config.model.projection_hidden_dim = 32
    config.model.projection_dim = 16
    config.optimizer.learning_rate = 1e-2
    return config_lib.shorten_to_smoke_test(config)
