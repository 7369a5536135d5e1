"""S-D pre-training of an MLP on Yeast (MULAN: 103 features, 14 gene-function labels).

The data ships inside the `river` wheel. About 40 seconds on a 2-core CPU.

COMMAND:
  python -m sdjax.main --config configs/yeast.py --workdir workdirs/yeast
  python -m sdjax.main --config configs/yeast.py:tiny --workdir /tmp/yeast_tiny
"""

from pathlib import Path

import ml_collections

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file(Path(__file__).with_name("default.py"))
    config.dataset.name = "yeast"
    config.model.encoder = ml_collections.ConfigDict(
        {"name": "mlp", "hidden_sizes": (256, 256), "dropout_rate": 0.0}
    )
    config.model.projection_hidden_dim = 128
    config.model.projection_dim = 64
    config.batch_size = 256
    config.num_train_steps = 600
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 50
    config.linear_eval.num_steps = 1000
    config.linear_eval.batch_size = 256
    config.eval_batch_size = 256
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.moco.queue_size = 1024  # framework "moco": fewer keys than the 1,500 examples

    return config_lib.apply_profile(config, profile, tiny=tiny)


def tiny(config) -> None:
    config.model.encoder.hidden_sizes = (32,)
