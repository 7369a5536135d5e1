"""S-D pre-training of a Transformer text encoder on Debian package descriptions (debtags).

Needs apt's lists with English descriptions, once: `apt-get update -o Acquire::Languages=en`
(or `--config.dataset.source_dir=DIR` holding copies). The first run builds the dataset and a
SentencePiece tokenizer into the data dir. About 3.5 minutes on a 2-core CPU, all included.

COMMAND:
  python -m sdjax.main --config configs/debtags.py --workdir workdirs/debtags
  python -m sdjax.main --config configs/debtags.py:tiny --workdir /tmp/debtags_tiny
"""

import ml_collections

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file("default")
    config.dataset.name = "debtags"
    config.dataset.vocab_size = 8000
    config.dataset.max_length = 48
    config.model.encoder = ml_collections.ConfigDict(
        {
            "name": "transformer",
            # References: a profile or override of dataset.* changes the model's with it.
            "vocab_size": config.dataset.get_ref("vocab_size"),
            "max_length": config.dataset.get_ref("max_length"),
            "width": 64,
            "depth": 2,
            "num_heads": 4,
            "mlp_dim": 128,
        }
    )
    config.batch_size = 128
    config.num_train_steps = 500
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 50
    config.linear_eval.num_steps = 1000
    config.eval_batch_size = 512
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200

    def tiny(config):
        config.dataset.vocab_size = 256
        config.dataset.max_length = 32
        config.model.encoder.update({"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64})
        config.dataset.train_examples = 512
        config.dataset.test_examples = 256

    quick = {
        "num_train_steps": 80,
        "optimizer.warmup_steps": 10,
        "dataset.train_examples": 4000,
        "dataset.test_examples": 2000,
        "linear_eval.num_steps": 300,
    }
    # A larger Transformer over longer inputs, 4x the batch, 10x the steps.
    gpu = {
        "dataset.max_length": 256,
        "model.encoder.width": 256,
        "model.encoder.depth": 4,
        "model.encoder.num_heads": 8,
        "model.encoder.mlp_dim": 1024,
        "batch_size": 512,
        "num_train_steps": 5000,
        "optimizer.warmup_steps": 250,
        "linear_eval.num_steps": 3000,
    }
    return config_lib.apply_profile(config, profile, quick=quick, tiny=tiny, gpu=gpu)
