"""The evaluators: plug-ins that score a trained model, switched on and off by `config.evals`.

Each evaluator is a module of this package named as in `EVALUATORS`, whose `Evaluator` is built
from the config (`Evaluator(config)`, reading its own section) and scores a model with
`run(model, data) -> results`: a dict of results.json entries, the validation split's under
"validation". `sdjax.evaluate` runs the ones that `config.evals` switches on, in the order of
`EVALUATORS`, on one `EvalData`, which holds the splits and what several evaluators share (the
linear probe's features and scores, the initial model), computed once.

- `heldout_loss`: "heldout_stage1_loss" {"initial", "final"}, the stage-1 loss of a fixed
  held-out batch with fixed views, and "heldout_split", the split it came from.
- `linear_probe`: "linear_eval", a linear multi-label classifier on frozen encoder features.
- `joint_classifier`: "classifier", the scores of the classifier trained with the encoder
  (`method = "joint"`; nothing for a model without one).
- `random_init_probe`: "random_init", the linear probe of the encoder before training.
- `save_test_outputs`: no entry; writes test_outputs.npz (test features, scores, labels) into
  the output directory.
- `long_tail`: "long_tail", macro-F1 and mAP of the head, medium and tail thirds of the labels
  (by training frequency) on test and on bootstrap resamples of it.

Adding one: a module here with an `Evaluator` class, its name in `EVALUATORS` and its switch in
configs/default.py's `config.evals`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from sdjax import config_lib

if TYPE_CHECKING:
    import ml_collections
    from flax import nnx

    from sdjax.evaluators.common import EvalData

#: Every evaluator, in the order they run: the module names of this package.
EVALUATORS = (
    "heldout_loss",
    "linear_probe",
    "joint_classifier",
    "random_init_probe",
    "save_test_outputs",
    "long_tail",
)


class Evaluator(Protocol):
    """What every evaluator module's `Evaluator` class is."""

    def __init__(self, config: ml_collections.ConfigDict) -> None: ...

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        """The results.json entries of `model` on `data` (the validation split's nested under
        "validation"); {} where the evaluator does not apply."""
        ...


def switched_on(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The evaluators that `config.evals` switches on, in the order they run.

    A config stored before `evals` existed ran the held-out loss, the probes and the joint
    classifier, and took the random-init probe and the test outputs from `linear_eval`'s
    `random_init_baseline` and `save_test_outputs`: so it runs the same ones here.
    """
    if "evals" in config:
        switches = dict(config.evals.items())
    else:
        linear_eval = config.linear_eval
        switches = {
            "heldout_loss": True,
            "linear_probe": True,
            "joint_classifier": True,
            "random_init_probe": linear_eval.get("random_init_baseline", True),
            "save_test_outputs": linear_eval.get("save_test_outputs", False),
        }
    return tuple(name for name in EVALUATORS if switches.get(name, False))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises `config_lib.ConfigError` unless `config.evals` holds a True or False for
    evaluators of `EVALUATORS` only."""
    for name, value in config.get("evals", {}).items():
        if name not in EVALUATORS:
            raise config_lib.ConfigError(
                f"config.evals.{name}: no such evaluator; expected names from {EVALUATORS}."
            )
        if not isinstance(value, bool):
            raise config_lib.ConfigError(
                f"config.evals.{name}: got {value!r}, expected True or False."
            )


def from_config(config: ml_collections.ConfigDict) -> list[tuple[str, Evaluator]]:
    """(name, evaluator) of every evaluator `config.evals` switches on, in the order they run."""
    return [
        (name, importlib.import_module(f"{__name__}.{name}").Evaluator(config))
        for name in switched_on(config)
    ]
