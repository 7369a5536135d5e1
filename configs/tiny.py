"""A seconds-long run of the whole trainer, for tests and smoke checks.

COMMAND:
  python -m sdjax.main --config configs/tiny.py --workdir /tmp/sdjax_tiny
"""

import importlib.util
from pathlib import Path


def get_config():
    # Loaded by path, so the config works wherever the repository sits.
    spec = importlib.util.spec_from_file_location("default", Path(__file__).with_name("default.py"))
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    config = default.get_config()
    config.dataset.name = "mnist_mosaic_tiny"
    config.model.encoder.stage_sizes = (1,)
    config.model.encoder.width = 8
    config.model.projection_hidden_dim = 32
    config.model.projection_dim = 16
    config.batch_size = 64
    config.num_train_steps = 24
    config.optimizer.warmup_steps = 2
    config.optimizer.learning_rate = 1e-2
    config.linear_eval.num_steps = 30
    config.linear_eval.batch_size = 64
    config.eval_batch_size = 128
    config.log_every_steps = 4
    config.checkpoint_every_steps = 8
    return config
