"""configs/debtags.py trained jointly: BCE of a linear classifier plus 0.3 x S-D, scored by
that classifier (the protocol's `joint` setting, experiments/protocol.py).

The joint weight, like the encoder's choices in configs/debtags.py, was chosen by test mAP in
the old experiment suite, so the scores it reached there support no claim (experiments/README.md,
the appendix "tuned on test"). The protocol tunes it again on validation. In its rehearsal,
protocol_quick, every debtags joint classifier scored below a probe on its own encoder. About 3
minutes a seed on a 2-core CPU once the data is built.

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
