"""Debtags' best sdjax model: configs/debtags.py trained jointly, BCE of a linear classifier
plus 0.3 x S-D, and scored by that classifier (the experiment suite's `joint` setting).

Its classifier reaches test mAP 0.421 and its linear probe 0.461, against 0.463 for the TF-IDF +
logistic regression reference (experiments/text_reference.py); about 3 minutes on a 2-core CPU
once the data is built.

COMMAND:
  python -m sdjax.main --config configs/debtags_joint.py --workdir workdirs/debtags_joint
  python -m sdjax.main --config configs/debtags_joint.py:tiny --workdir /tmp/debtags_joint_tiny
"""

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file("debtags", profile)
    config.method = "joint"
    return config
