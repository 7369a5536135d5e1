"""S-D pre-training on Fashion-MNIST mosaics (2x2 grids of clothing, 1-4 classes each).

Needs the Fashion-MNIST idx files: `apt-get install dataset-fashion-mnist`, or
`--config.dataset.source_dir=DIR`. About 2.5 minutes on a 2-core CPU, dataset build included.

COMMAND:
  python -m sdjax.main --config configs/fashion_mosaic.py --workdir workdirs/fashion_mosaic
  python -m sdjax.main --config configs/fashion_mosaic.py:tiny --workdir /tmp/fashion_tiny
"""

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file("default")
    config.dataset.name = "fashion_mosaic"
    if profile == "tiny":
        config.dataset.name = "fashion_mosaic_tiny"
        config.model.encoder.stage_sizes = (1,)
        config.model.encoder.width = 8
        config.optimizer.learning_rate = 1e-2
        config_lib.shorten_to_smoke_test(config)
    elif profile:
        raise ValueError(f"profile: got {profile!r}, expected '' or 'tiny'.")
    return config
