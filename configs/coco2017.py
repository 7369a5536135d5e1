"""S-D pre-training of a ResNet-50 on COCO 2017 (the set of 80 object categories per image).

tfds downloads `coco/2017` (about 25 GB) into the data dir on first use; train on "train",
test on "validation". Images are streamed (each host decodes only its slice of a batch), so
host memory does not grow with the dataset. Settings for a GPU/TPU slice; the batch is global
and split over every device of every host.

COMMAND:
  python -m sdjax.main --config configs/coco2017.py --workdir workdirs/coco2017
  python -m sdjax.main --config configs/coco2017.py --workdir workdirs/coco2017 \
      --config.multihost.enabled=True   # on each host of a multi-host slice
"""

from pathlib import Path

from sdjax import config_lib

VOC2007 = Path(__file__).with_name("voc2007.py")


def get_config(profile: str = ""):
    config = config_lib.load_config_file(VOC2007)
    config.dataset.name = "coco2017"
    config.dataset.image_size = 160
    config.model.encoder.update({"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"})
    config.batch_size = 1024
    config.num_train_steps = 20_000
    config.optimizer.warmup_steps = 1_000
    config.linear_eval.num_steps = 10_000
    return config_lib.apply_profile(config, profile, tiny=tiny)


def tiny(config) -> None:
    """VOC 2007's tiny model, with its basic blocks."""
    config_lib.config_module(VOC2007).tiny(config)
    config.model.encoder.block = "basic"
