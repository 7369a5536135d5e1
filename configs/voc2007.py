"""S-D pre-training of a ResNet on PASCAL VOC 2007 image-level labels (20 classes), for GPU/TPU.

tfds downloads `voc/2007` (about 0.9 GB) into the data dir on first use. The batch is global:
it is split over every device of every host, and the loss contrasts each view against the
whole global batch. Multi-host: add `--config.multihost.enabled=True`.

COMMAND:
  python -m sdjax.main --config configs/voc2007.py --workdir workdirs/voc2007
  python -m sdjax.main --config configs/voc2007.py --workdir workdirs/voc2007_any \
      --config.loss.positives=any
"""

from pathlib import Path

import ml_collections

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file(Path(__file__).with_name("default.py"))
    config.dataset.name = "voc2007"
    config.dataset.image_size = 224
    config.model.encoder = ml_collections.ConfigDict(
        {
            "name": "resnet",
            "stage_sizes": (2, 2, 2, 2),
            "width": 64,
            "block": "basic",
        }
    )
    config.model.encoder.stem_stride = 4
    config.model.projection_hidden_dim = 2048
    config.model.projection_dim = 128
    config.batch_size = 512
    config.num_train_steps = 5_000
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.warmup_steps = 500
    config.linear_eval.num_steps = 5_000
    config.linear_eval.batch_size = 1024
    config.eval_batch_size = 1024
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1_000

    return config_lib.apply_profile(config, profile, tiny=tiny)


def tiny(config) -> None:
    """The pipeline in seconds, e.g. under tfds.testing.mock_data."""
    config.dataset.image_size = 32
    config.model.encoder.update({"stage_sizes": (1,), "width": 8})
    config.model.projection_hidden_dim = 32
    config.model.projection_dim = 16
