"""S-D pre-training on Fashion-MNIST mosaics (2x2 grids of clothing, 1-4 classes each).

Needs the Fashion-MNIST idx files: `apt-get install dataset-fashion-mnist`, or
`--config.dataset.source_dir=DIR`. About 2.5 minutes on a 2-core CPU, dataset build included.

COMMAND:
  python -m sdjax.main --config configs/fashion_mosaic.py --workdir workdirs/fashion_mosaic
  python -m sdjax.main --config configs/fashion_mosaic.py:tiny --workdir /tmp/fashion_tiny
"""

from pathlib import Path

from sdjax import config_lib

DEFAULT = Path(__file__).with_name("default.py")


def get_config(profile: str = ""):
    # The MNIST-mosaic settings and tiny model, on clothing instead of digits.
    config = config_lib.load_config_file(DEFAULT)
    config.dataset.name = "fashion_mosaic"
    return config_lib.apply_profile(config, profile, tiny=config_lib.config_module(DEFAULT).tiny)
