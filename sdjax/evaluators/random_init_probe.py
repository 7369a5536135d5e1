"""The linear probe of the encoder before training: how much of "linear_eval" training earned.

Results: "random_init" (and "validation": {"random_init": ...}), with "linear_eval"'s keys.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from sdjax import evaluators
from sdjax.evaluators import linear_probe
from sdjax.evaluators.common import EvalData


class Evaluator(evaluators.Evaluator):
    """`linear_probe`'s probe, with the same settings, of `EvalData.initial_model`."""

    def __init__(self, config: ml_collections.ConfigDict):
        del config  # `linear_probe.outcomes` reads the settings

    def run(self, model: nnx.Module, data: EvalData) -> dict[str, Any]:
        del model  # the initial model is probed, whatever was trained
        probed = linear_probe.outcomes(data.initial_model(), data)
        return linear_probe.split_entries(
            "random_init", {split: probed[split].metrics for split in probed}
        )
