"""Config files, profiles, overrides and the checks every config passes before anything runs.

A config file is a Python file with `get_config(profile="")`; `configs/NAME.py:PROFILE` on
the command line (or `load_config_file("configs/NAME.py", "PROFILE")`) picks a profile, one of
`PROFILES`. Every config file is written the same way:

    def get_config(profile: str = ""):
        config = config_lib.load_config_file(Path(__file__).with_name("default.py"))  # its base
        ...  # the file's own settings
        return config_lib.apply_profile(config, profile, tiny=tiny)

It starts from its base's own settings (no profile), and `apply_profile` applies the profile
once, at the end, with the file's `tiny` model shrinking (a file may reuse its base's:
`config_module(path).tiny`). The base is found by a path relative to the file, so that it works
from any directory and from an installed wheel, which has no `configs/` of its own.

What the data determines is not written in config files: `apply_profile` sets the encoder's
input size (`INPUT_SIZE_FIELDS`) from the dataset registry, and the trainer takes the number of
classes from the loaded labels. Budgets of experiment suites (fewer steps, larger models) are
the suites' own: experiments/budgets.py.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
from flax import nnx

from sdjax import datasets, losses, models

# Where a bare NAME is looked up: the `configs/` folder of a clone (an installed wheel has none).
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# "": the file's own settings; "tiny": the whole pipeline in seconds (tests, smoke checks).
PROFILES = ("", "tiny")

# The encoder field that the size of the inputs' last axis sets, by encoder name (the
# bag_of_ngrams encoder takes texts of any length).
INPUT_SIZE_FIELDS = {"resnet": "in_channels", "mlp": "in_features", "transformer": "max_length"}

# Fields that cannot change a run's results: a resumed run may change them.
RESULT_NEUTRAL_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "max_checkpoints_to_keep",
    "dataset.data_dir",
    "dataset.source_dir",
    "evals.",  # which evaluators run after training
    "linear_eval.save_test_outputs",  # evals.save_test_outputs before `evals` existed
    "linear_eval.random_init_baseline",  # evals.random_init_probe before `evals` existed
    "eval_split",
    "multihost.",  # a section: where the processes meet changes nothing they compute
)


class ConfigError(ValueError):
    """A config that cannot run; the message is one line that names the field."""


def one_line(error: Exception) -> str:
    """The message of `error` on one line, as the commands print failures (some messages list
    files to download one per line)."""
    return " ".join(str(error).split())


def load_config_file(path: str | Path, profile: str = "") -> ml_collections.ConfigDict:
    """`get_config(profile)` of a config file.

    Args:
      path: a config file's path ("configs/yeast.py"), or a bare name ("yeast") for
        `configs/yeast.py` of the clone this package runs from. It may carry the profile, as on
        the command line: "configs/yeast.py:tiny".
      profile: one of `PROFILES`; "" = the one `path` carries, if any.

    Returns:
      The file's `get_config(profile)`.
    """
    path = str(path)
    if ":" in path and not profile:
        path, profile = path.rsplit(":", 1)
    return config_module(path).get_config(profile)


def config_module(path: str | Path):
    """The module of a config file (a path or a bare name, as in `load_config_file`), freshly
    executed: its `get_config` and its `tiny`."""
    file = Path(path)
    if file.suffix != ".py":
        file = CONFIGS_DIR / f"{path}.py"
    if not file.exists():
        raise FileNotFoundError(f"`path`: got {str(file)!r}, no such config file.")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    assert spec is not None and spec.loader is not None  # a .py file that exists has both
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_profile(
    config: ml_collections.ConfigDict,
    profile: str,
    *,
    tiny: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> ml_collections.ConfigDict:
    """The one profile parser of every config file, called last by its `get_config`.

    "tiny" shrinks the model with the file's `tiny`, trains on the dataset's tiny build if it
    has one (`Dataset.tiny`), and runs 24 short steps. Then, whatever the profile, the
    encoder's input size is set from the dataset (`INPUT_SIZE_FIELDS`).

    Args:
      config: the file's full settings.
      profile: one of `PROFILES`: "" (as is) or "tiny".
      tiny: the file's model shrinking for "tiny", applied before the shared short run.

    Returns:
      `config`, changed in place.
    """
    if profile not in PROFILES:
        raise ConfigError(f"profile: got {profile!r}, expected one of {PROFILES}.")
    if profile == "tiny":
        if tiny is not None:
            tiny(config)
        dataset = datasets.DATASETS.get(config.dataset.name)
        if dataset is not None and dataset.tiny:
            config.dataset.name = dataset.tiny
        override(
            config,
            batch_size=64,
            num_train_steps=24,
            log_every_steps=4,
            checkpoint_every_steps=8,
            eval_batch_size=128,
            **{
                "optimizer.warmup_steps": 2,
                "linear_eval.num_steps": 30,
                "linear_eval.batch_size": 64,
            },
        )
    set_input_size(config)
    return config


def set_input_size(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets the encoder's `INPUT_SIZE_FIELDS` field to the size of the last axis of
    `config.dataset`'s inputs (`sdjax.datasets.input_shape`); an unknown dataset or an encoder
    without such a field is left as it is (`check_config` names an unknown dataset)."""
    field = INPUT_SIZE_FIELDS.get(config.model.encoder.get("name"))
    if field is not None and config.dataset.name in datasets.DATASETS:
        config.model.encoder[field] = datasets.input_shape(config.dataset)[-1]
    return config


def override(config: ml_collections.ConfigDict, **dotted: Any) -> ml_collections.ConfigDict:
    """Sets fields by dotted name, `override(config, **{"loss.positives": "any"})`.

    Only existing fields, with their own types: a misspelt name is a `ConfigError` with a
    suggestion, as on the command line.
    """
    for key in dotted:
        check_field(config, key)
    was_locked = config.is_locked
    config.lock()
    try:
        config.update_from_flattened_dict(dotted)
    except TypeError as error:
        raise ConfigError(f"Bad override: {error}") from None
    finally:
        if not was_locked:
            config.unlock()
    return config


def check_field(config: ml_collections.ConfigDict, dotted: str) -> None:
    """Raises ConfigError if `config` has no field `dotted`, with the closest name if any."""
    node: Any = config
    walked: list[str] = []
    for key in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or key not in node:
            siblings = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, siblings, n=1)
            hint = f'; did you mean "{".".join([*walked, close[0]])}"?' if close else "."
            raise ConfigError(f"config.{dotted}: no such field{hint}")
        node, walked = node[key], [*walked, key]


def flat_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted name: value} of every leaf, JSON-comparable (tuples as lists)."""
    flat = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(json.loads(config.to_json()), "")
    return flat


# Fields added after runs were stored: a stored config without one ran as this value says.
ADDED_FIELD_DEFAULTS = {"dataset.validation": False, "optimizer.classifier_learning_rate": 0.0}


def result_changing_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted fields, other than RESULT_NEUTRAL_FIELDS, whose values differ."""
    stored = {**ADDED_FIELD_DEFAULTS, **stored}
    fields = sorted(set(stored) | set(current))
    return [
        f"{name}: {stored.get(name, '<absent>')!r} -> {current.get(name, '<absent>')!r}"
        for name in fields
        if not _is_result_neutral(name) and stored.get(name) != current.get(name)
    ]


def _is_result_neutral(name: str) -> bool:
    return any(
        name == field or (field.endswith(".") and name.startswith(field))
        for field in RESULT_NEUTRAL_FIELDS
    )


# --------------------------------------------------------------------------------------------
# Checks: every setting that cannot work is one line, before data loads or anything compiles
# --------------------------------------------------------------------------------------------

_POSITIVE_INTS = (
    "num_views",
    "batch_size",
    "eval_batch_size",
    "num_train_steps",
    "log_every_steps",
    "checkpoint_every_steps",
    "max_checkpoints_to_keep",
    "linear_eval.num_steps",
    "linear_eval.batch_size",
    "model.projection_hidden_dim",
    "model.projection_dim",
    "moco.queue_size",
)
_NON_NEGATIVE_INTS = (
    "seed",
    "multihost.num_processes",
    "multihost.initialization_timeout_s",
    "optimizer.warmup_steps",
    "loss.block_size",
    "embedding_chunk_size",
    "dataset.train_examples",
    "dataset.test_examples",
)
_POSITIVE_FLOATS = ("optimizer.learning_rate", "linear_eval.learning_rate", "loss.temperature")
_NON_NEGATIVE_FLOATS = (
    "optimizer.weight_decay",
    "optimizer.classifier_learning_rate",
    "linear_eval.weight_decay",
    "loss.joint_weight",
)
_CHOICES = {
    "method": ("contrastive", "bce", "joint"),
    "framework": ("in_batch", "moco"),
    "model.encoder.name": ("resnet", "mlp", "transformer", "bag_of_ngrams"),
    "compute_dtype": ("float32", "bfloat16"),
    "eval_split": ("test", "validation"),
}


def _fail(field: str, got: Any, expected: str) -> None:
    raise ConfigError(f"config.{field}: got {got!r}, expected {expected}.")


def check_config(config: ml_collections.ConfigDict, *, num_devices: int, num_processes: int):
    """Raises ConfigError naming the first field that cannot work.

    Args:
      config: a full training config.
      num_devices, num_processes: of the run, which the batches are split over.
    """
    for field in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
        value, low = config[field], 1 if field in _POSITIVE_INTS else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            _fail(field, value, f"an int >= {low}")
    for field in _POSITIVE_FLOATS + _NON_NEGATIVE_FLOATS:
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(field, value, "a number")
        if not math.isfinite(value) or value < 0 or (field in _POSITIVE_FLOATS and value == 0):
            _fail(field, value, f"a finite number {'>' if field in _POSITIVE_FLOATS else '>='} 0")
    for field, choices in {
        **_CHOICES,
        "loss.positives": losses.POSITIVES,
        "loss.exchange": losses.EXCHANGES,
        "dataset.name": tuple(sorted(datasets.DATASETS)),
    }.items():
        if config[field] not in choices:
            _fail(field, config[field], f"one of {choices}")
    if not 0 < config.loss.jaccard_threshold <= 1:
        _fail("loss.jaccard_threshold", config.loss.jaccard_threshold, "a number in (0, 1]")
    _check_moco(config)
    if config.eval_split == "validation" and not config.dataset.validation:
        _fail("eval_split", config.eval_split, '"test" unless dataset.validation is True')
    if config.optimizer.warmup_steps > config.num_train_steps:
        _fail("optimizer.warmup_steps", config.optimizer.warmup_steps, "<= num_train_steps")
    for field in ("batch_size", "eval_batch_size"):  # both are split over devices and hosts
        if config[field] % num_devices:
            _fail(field, config[field], f"a multiple of the {num_devices} devices")
        if config[field] % num_processes:
            _fail(field, config[field], f"a multiple of the {num_processes} processes")
    if config.embedding_chunk_size:  # chunks of the encoder inputs, split over devices
        # The trained encoder sees every view in-batch, the queries (view 0) alone with MoCo.
        views = 1 if config.method == "bce" or config.framework == "moco" else config.num_views
        inputs = config.batch_size * views
        if inputs % config.embedding_chunk_size or config.embedding_chunk_size % num_devices:
            _fail(
                "embedding_chunk_size",
                config.embedding_chunk_size,
                f"a divisor of the {inputs} encoder inputs per step (batch_size x {views} "
                f"views) and a multiple of the {num_devices} devices",
            )
    limit = config.dataset.train_examples
    if limit and config.batch_size > limit:
        _fail("batch_size", config.batch_size, f"<= dataset.train_examples = {limit}")
    size = datasets.DATASETS[config.dataset.name].train_size
    if size is not None and config.batch_size > size:  # else check_data_fits, once loaded
        _fail(
            "batch_size",
            config.batch_size,
            f"<= the {size} training examples of {config.dataset.name}",
        )
    _check_model(config)


def _check_model(config: ml_collections.ConfigDict) -> None:
    """Builds the model abstractly (shapes only, nothing allocated): the encoders' own checks
    of their fields run now, before any data loads, rather than once the model is built."""
    encoder = config.model.encoder
    for field, value in encoder.items():  # the encoders convert sizes with int()
        if isinstance(value, tuple) and not all(
            isinstance(n, int) and not isinstance(n, bool) for n in value
        ):
            _fail(f"model.encoder.{field}", value, "a tuple of ints")
    try:
        nnx.eval_shape(lambda: models.create_model(config, num_classes=2, seed=config.seed))
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


def _check_moco(config: ml_collections.ConfigDict) -> None:
    momentum = config.moco.momentum
    if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0 <= momentum < 1:
        _fail("moco.momentum", momentum, "a number in [0, 1)")
    if config.framework != "moco":
        return
    if config.method == "bce":
        _fail("method", config.method, '"contrastive" or "joint" with framework "moco"')
    if config.num_views != 2:
        _fail("num_views", config.num_views, '2 with framework "moco" (query and key)')
    if config.moco.queue_size % config.batch_size:
        _fail(
            "moco.queue_size",
            config.moco.queue_size,
            f"a multiple of batch_size = {config.batch_size}",
        )


def check_data_fits(config: ml_collections.ConfigDict, train: dict) -> None:
    """Raises ConfigError when the batch or the encoder's input fields disagree with the data."""
    inputs, num_examples = train["inputs"], len(train["labels"])
    if config.batch_size > num_examples:
        _fail(
            "batch_size",
            config.batch_size,
            f"<= the {num_examples} training examples of {config.dataset.name}",
        )
    encoder = config.model.encoder
    expected = {
        "resnet": ("in_channels", inputs.shape[-1]),
        "mlp": ("in_features", inputs.shape[-1]),
        "transformer": ("max_length", inputs.shape[-1]),
    }.get(encoder.name)  # bag_of_ngrams takes texts of any length
    if expected and encoder[expected[0]] != expected[1]:
        raise ConfigError(
            f"config.model.encoder.{expected[0]}: got {encoder[expected[0]]!r}, expected "
            f"{expected[1]} for {config.dataset.name} inputs of shape {inputs.shape[1:]}."
        )
    if encoder.name in ("transformer", "bag_of_ngrams") and inputs.max() >= encoder.vocab_size:
        raise ConfigError(
            f"config.model.encoder.vocab_size: got {encoder.vocab_size}, expected > "
            f"{inputs.max()}, the largest token id of {config.dataset.name}."
        )
