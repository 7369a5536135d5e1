"""Loading config files by path, the way `config_flags` does, for tests and experiment runners."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config_file(path: str | Path, profile: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(profile)` of the config file at `path` (`configs/NAME.py` if just a name)."""
    path = Path(path)
    if path.suffix != ".py":
        path = CONFIGS_DIR / f"{path}.py"
    if not path.exists():
        raise FileNotFoundError(f"`path`: got {str(path)!r}, no such config file.")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if profile is None else module.get_config(profile)


def override(config: ml_collections.ConfigDict, **dotted: object) -> ml_collections.ConfigDict:
    """Sets fields by dotted name, e.g. `override(config, **{"loss.positives": "any"})`."""
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        if leaf not in target:
            raise KeyError(f"config.{key}: no such field.")
        target[leaf] = value
    return config


def shorten_to_smoke_test(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run-length settings every `:tiny` profile shares: seconds, not minutes."""
    config.batch_size = 64
    config.num_train_steps = 24
    config.optimizer.warmup_steps = 2
    config.linear_eval.num_steps = 30
    config.linear_eval.batch_size = 64
    config.eval_batch_size = 128
    config.log_every_steps = 4
    config.checkpoint_every_steps = 8
    return config
