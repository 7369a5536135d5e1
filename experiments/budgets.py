"""The experiment suite's budgets: how its profiles change the config files' own settings.

A suite profile names a budget, its `config_profile`: "" (the config files as they are),
"tiny" (their own tiny profile), or one of the budgets here, which are the suite's, not the
config files': "quick" (fewer steps and examples, the same models) and "gpu" (the accelerator
budget: larger encoders, batches and step counts, computed in bfloat16). A budget is a set of
dotted overrides of a config file's settings; `load_config` applies it.
"""

from __future__ import annotations

MNIST_MOSAIC_QUICK = {
    "num_train_steps": 60,
    "batch_size": 128,
    "optimizer.warmup_steps": 10,
    "dataset.train_examples": 3000,
    "dataset.test_examples": 1000,
    "linear_eval.num_steps": 300,
}
# A ResNet-18-sized encoder, 4x the batch, about 160 epochs of the 10,000 mosaics instead of 10.
MNIST_MOSAIC_GPU = {
    "model.encoder.stage_sizes": (2, 2, 2, 2),
    "model.encoder.width": 64,
    "batch_size": 1024,
    "num_train_steps": 1600,
    "optimizer.warmup_steps": 100,
    "moco.queue_size": 8192,
    "linear_eval.num_steps": 3000,
}
DEBTAGS_QUICK = {
    "num_train_steps": 200,
    "optimizer.warmup_steps": 10,
    "dataset.train_examples": 4000,
    "dataset.test_examples": 2000,
    "linear_eval.num_steps": 300,
}
# Wider, with hashed bigrams, 2x the batch and 5x the steps.
DEBTAGS_GPU = {
    "model.encoder.width": 1024,
    "model.encoder.num_buckets": 2**18,
    "batch_size": 256,
    "num_train_steps": 5000,
    "optimizer.warmup_steps": 250,
    "linear_eval.num_steps": 3000,
}

# {budget: {config file: overrides}}. A config file absent from a budget has none (VOC 2007,
# COCO 2017). mulsupcon_setting and debtags_joint are not suite runs; they keep the budgets
# they had as config-file profiles.
BUDGETS = {
    "quick": {
        "default": MNIST_MOSAIC_QUICK,
        "fashion_mosaic": MNIST_MOSAIC_QUICK,
        "yeast": {"num_train_steps": 200, "linear_eval.num_steps": 500},
        "debtags": DEBTAGS_QUICK,
        "debtags_joint": DEBTAGS_QUICK,
        "mulsupcon_setting": {"num_train_steps": 3000, "linear_eval.num_steps": 500},
    },
    "gpu": {
        "default": MNIST_MOSAIC_GPU,
        "fashion_mosaic": MNIST_MOSAIC_GPU,
        # Yeast has 1,500 training examples: a wider, deeper MLP and longer training, same batch.
        "yeast": {
            "model.encoder.hidden_sizes": (1024, 1024, 1024),
            "num_train_steps": 3000,
            "linear_eval.num_steps": 2000,
        },
        "debtags": DEBTAGS_GPU,
        "debtags_joint": DEBTAGS_GPU,
        "mulsupcon_setting": {},  # MulSupCon's own budget already; the budget adds bfloat16
    },
}
COMPUTE_DTYPE = {"gpu": "bfloat16"}  # budgets that also change the arithmetic


def load_config(config_file: str, config_profile: str = ""):
    """The config of `configs/<config_file>.py` on a suite profile's `config_profile`.

    Args:
      config_file: a config file's name in configs/, without ".py" ("yeast").
      config_profile: "" or "tiny" (the config file's own profiles), or a key of BUDGETS.

    Raises:
      config_lib.ConfigError: an unknown profile, or a budget without this config file.
    """
    from sdjax import config_lib

    if config_profile not in BUDGETS:
        return config_lib.load_config_file(config_file, config_profile)
    overrides = BUDGETS[config_profile].get(config_file)
    if overrides is None:
        raise config_lib.ConfigError(
            f"config_profile: got {config_profile!r}, but the suite has no such budget for "
            f"{config_file}; those it has: {sorted(BUDGETS[config_profile])}."
        )
    if config_profile in COMPUTE_DTYPE:
        overrides = {"compute_dtype": COMPUTE_DTYPE[config_profile], **overrides}
    return config_lib.override(config_lib.load_config_file(config_file), **overrides)
