"""Evaluation of a trained model, at the end of training or on any workdir's checkpoint.

COMMAND:
  python -m sdjax.evaluate --workdir workdirs/default   # the newest checkpoint, its own config
  python -m sdjax.evaluate --workdir workdirs/default --output_dir /tmp/evaluation

Evaluating never changes the run it evaluates: nothing is written into the workdir, which may
be read-only. The results are printed as one JSON line; `--output_dir` (outside the workdir)
also gets results.json, the TensorBoard scalars and, if the config asks, test_outputs.npz. The
newest checkpoint that restores is evaluated: a damaged newer one is skipped, as the trainer
skips it, and left where it is. A failure is one line on stderr, with exit status 2 (no such
workdir, no checkpoint that restores, an --output_dir inside the workdir, missing data).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from sdjax import (
    checkpointing,
    config_lib,
    datasets,
    evaluators,
    metric_writers,
    reporting,
)
from sdjax.evaluators.common import EvalData
from sdjax.recipe import Recipe
from sdjax.sharding import data_parallel_mesh


def evaluate(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    data: dict[str, dict[str, Any]],
    mesh: jax.sharding.Mesh,
    output_dir: Path | None,
    writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
    """Runs the evaluators that `config.evals` switches on (`sdjax.evaluators`), in order.

    Args:
      config: the run's config.
      model: the trained model, replicated on `mesh`.
      data: {"train": arrays, and the scored splits "validation" and/or "test"}, as
        `datasets.run_splits(config)` names them.
      mesh: the data-parallel mesh.
      output_dir: where evaluators write files (test_outputs.npz); None writes none.
      writer: gets every number of the results at step `config.num_train_steps`, named by its
        path ("linear_eval/mAP", "validation/classifier/mAP", "heldout_stage1_loss/final").

    Returns:
      Every evaluator's entries (see `sdjax.evaluators`; "validation" gathers the validation
      split's), then "stage2_seconds", the time all of them took.
    """
    start = time.time()
    shared = EvalData(config, mesh, data, output_dir)
    results: dict[str, Any] = {}
    for _, evaluator in evaluators.from_config(config):
        entries = evaluator.run(model, shared)
        if scalars := dict(_numbers(entries)):
            writer.write_scalars(config.num_train_steps, scalars)
        _merge(results, entries)
    results["stage2_seconds"] = time.time() - start
    return results


def _numbers(entries: dict[str, Any], prefix: str = ""):
    """(path, value) of every number in nested `entries`."""
    for key, value in entries.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def _merge(results: dict[str, Any], entries: dict[str, Any]) -> None:
    """Adds `entries` to `results`; a dict in both (such as "validation") gets the new keys."""
    for key, value in entries.items():
        if isinstance(value, dict) and isinstance(results.get(key), dict):
            _merge(results[key], value)
        else:
            results[key] = value


class RestoredRun(NamedTuple):
    """A trained run as `restore_workdir` restores it, ready for `evaluate`."""

    config: ml_collections.ConfigDict  # the run's own, stored in its workdir
    model: nnx.Module  # replicated on `mesh`
    data: dict[str, dict[str, Any]]  # as `evaluate` takes it
    mesh: jax.sharding.Mesh
    step: int  # the restored checkpoint's


def restore_workdir(workdir: str | Path) -> RestoredRun:
    """The model of the newest checkpoint of `workdir` that restores, with the run's stored
    config and its data, reading nothing but the workdir and the dataset.

    Raises:
      checkpointing.NoCheckpoint: `workdir` does not exist or no checkpoint restores.
      datasets.DataUnavailable: the dataset's source files are missing.
    """
    workdir = Path(workdir)
    config, _ = checkpointing.stored_config(workdir)
    mesh = data_parallel_mesh()
    data = datasets.load_splits(config.dataset, datasets.run_splits(config))
    recipe = Recipe(config, mesh)
    state = recipe.create_state(data["train"]["labels"].shape[1])
    step, restored = checkpointing.restore_newest(workdir, recipe.checkpoint(state))
    recipe.restore(state, restored)
    return RestoredRun(config, state.model, data, mesh, step)


class WouldChangeTheRun(ValueError):
    """An output directory inside the workdir that is evaluated."""


def evaluate_workdir(workdir: str | Path, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Restores the newest checkpoint of `workdir` that restores, with its stored config, and
    evaluates it. Nothing is written into `workdir`.

    Args:
      workdir: a training workdir.
      output_dir: where results.json (with `evaluated_step`), the TensorBoard scalars and any
        test outputs go, created if needed; None writes nothing.

    Raises:
      checkpointing.NoCheckpoint: `workdir` does not exist or no checkpoint restores.
      WouldChangeTheRun: `output_dir` is `workdir` or lies inside it.
      datasets.DataUnavailable: the dataset's source files are missing.
    """
    workdir = Path(workdir)
    if output_dir is not None:
        output_dir = Path(output_dir)
        if output_dir.resolve().is_relative_to(workdir.resolve()):
            raise WouldChangeTheRun(
                f"--output_dir {output_dir} lies inside the workdir {workdir}; evaluating never "
                "writes into the run it evaluates: pass a directory outside it."
            )
    restored = restore_workdir(workdir)
    config, model, data, mesh = restored.config, restored.model, restored.data, restored.mesh
    is_chief = jax.process_index() == 0
    if output_dir is not None and is_chief:
        output_dir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.create_default_writer(output_dir, just_logging=not is_chief)
    results = {"evaluated_step": restored.step, "config": config.to_dict()}
    results |= evaluate(config, model, data, mesh, output_dir, writer)
    writer.close()
    if output_dir is not None and is_chief:
        reporting.write_results(output_dir, results)
    return results


def main(argv: list[str]) -> int:
    """`python -m sdjax.evaluate --workdir DIR`: `evaluate_workdir(DIR)`, results on stdout.

    Returns:
      The exit status: 0, or 2 when DIR has no checkpoint to evaluate.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpointing.quiet_orbax_logs()
    try:
        results = evaluate_workdir(flags.FLAGS.workdir, flags.FLAGS.output_dir)
    except (
        checkpointing.NoCheckpoint,
        WouldChangeTheRun,
        datasets.DataUnavailable,
        datasets.MissingExtra,
    ) as error:
        print(f"Cannot evaluate: {config_lib.one_line(error)}", file=sys.stderr)
        return 2
    logging.info("Evaluated checkpoint %d.", results["evaluated_step"])
    print(json.dumps({k: v for k, v in results.items() if k != "config"}))
    return 0


if __name__ == "__main__":  # flags here: the trainer imports this module and has its own
    flags.DEFINE_string("workdir", None, "A training workdir with checkpoints.", required=True)
    flags.DEFINE_string(
        "output_dir", None, "Where to write results.json and TensorBoard scalars (not the workdir)."
    )
    app.run(main)
