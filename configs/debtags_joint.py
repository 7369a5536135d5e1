"""Debtags' best sdjax model: configs/debtags.py trained jointly, BCE of a linear classifier
plus 0.3 x S-D, and scored by that classifier (the experiment suite's `joint` setting).

Over 5 seeds its linear probe reaches test mAP 0.4649 (95% interval [0.4631, 0.4668]) and its
classifier 0.420, against 0.4627 for the TF-IDF + logistic regression reference
(experiments/text_reference.py; `python -m experiments.debtags_model` reproduces the
comparison). About 3 minutes a seed on a 2-core CPU once the data is built.

COMMAND:
  python -m sdjax.main --config configs/debtags_joint.py --workdir workdirs/debtags_joint
  python -m sdjax.main --config configs/debtags_joint.py:tiny --workdir /tmp/debtags_joint_tiny
"""

from pathlib import Path

from sdjax import config_lib

DEBTAGS = Path(__file__).with_name("debtags.py")


def get_config(profile: str = ""):
    config = config_lib.load_config_file(DEBTAGS)
    config.method = "joint"
    return config_lib.apply_profile(config, profile, tiny=config_lib.config_module(DEBTAGS).tiny)
