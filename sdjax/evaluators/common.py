"""What the evaluators of one evaluation share: `EvalData`."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from sdjax.recipe import Recipe


class EvalData:
    """The splits an evaluation scores, where it may write files, and what more than one
    evaluator needs, computed once (`once`): one per evaluation, shared by its evaluators.

    Attributes:
      config: the run's config.
      mesh: the data-parallel mesh the model is replicated on.
      train: the training split's arrays ({"inputs", "labels"}).
      scored: {split: arrays} of the scored splits, "validation" before "test", as
        `datasets.run_splits(config)` names them; test is absent when
        `eval_split = "validation"`.
      output_dir: where evaluators write files (the workdir, or `sdjax.evaluate`'s
        --output_dir); None writes none.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        splits: dict[str, dict[str, Any]],
        output_dir: Path | None,
    ):
        self.config = config
        self.mesh = mesh
        self.train = splits["train"]
        self.scored: dict[str, dict[str, Any]] = {
            split: splits[split] for split in ("validation", "test") if split in splits
        }
        self.output_dir = None if output_dir is None else Path(output_dir)
        self._computed: dict[Hashable, Any] = {}

    def once(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """`compute()` the first time `key` is asked for; the same value after that. A key that
        depends on a model holds `id(model)`: the models outlive the evaluation."""
        if key not in self._computed:
            self._computed[key] = compute()
        return self._computed[key]

    def initial_model(self) -> nnx.Module:
        """The model as training began (the config's seed, no step taken), replicated."""

        return self.once(
            "initial_model",
            lambda: Recipe(self.config, self.mesh).create_model(self.train["labels"].shape[1]),
        )
