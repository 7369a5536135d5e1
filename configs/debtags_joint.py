"""Debtags with a fastText-style encoder trained jointly: BCE of a linear classifier plus S-D.

configs/debtags.py's data and loss, with a bag of token and hashed bigram embeddings
(sdjax/models/bag_of_ngrams.py) over longer inputs, `method = "joint"`, and more steps.

COMMAND:
  python -m sdjax.main --config configs/debtags_joint.py --workdir workdirs/debtags_joint
  python -m sdjax.main --config configs/debtags_joint.py:tiny --workdir /tmp/debtags_joint_tiny
"""

import ml_collections

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file("debtags")
    config.method = "joint"
    config.dataset.max_length = 256
    config.model.encoder = ml_collections.ConfigDict(
        {
            "name": "bag_of_ngrams",
            # A reference: a profile or override of dataset.vocab_size changes the model's.
            "vocab_size": config.dataset.get_ref("vocab_size"),
            "width": 128,
            "num_buckets": 2**17,
            "hidden_dim": 0,
        }
    )
    config.num_train_steps = 1000
    config.optimizer.learning_rate = 1e-2

    def tiny(config):
        config.dataset.vocab_size = 256
        config.dataset.max_length = 32
        config.model.encoder.update({"width": 32, "num_buckets": 512})
        config.dataset.train_examples = 512
        config.dataset.test_examples = 256

    quick = {
        "num_train_steps": 200,
        "optimizer.warmup_steps": 10,
        "dataset.train_examples": 4000,
        "dataset.test_examples": 2000,
        "linear_eval.num_steps": 300,
    }
    return config_lib.apply_profile(config, profile, quick=quick, tiny=tiny)
