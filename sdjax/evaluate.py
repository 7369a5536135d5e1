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
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from sdjax import checkpointing, config_lib, datasets, evaluation, metric_writers, objectives
from sdjax.evaluators import HeldoutLoss, LinearProbe, joint_classifier_scores, save_test_outputs
from sdjax.sharding import data_parallel_mesh, replicate


def evaluate(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    data: dict[str, dict[str, Any]],
    mesh: jax.sharding.Mesh,
    output_dir: Path | None,
    writer: metric_writers.MetricWriter,
) -> dict[str, Any]:
    """Held-out stage-1 loss (initial and final), linear probes and, if asked, test outputs
    (into `output_dir`; None writes none).

    Args:
      data: {"train": arrays, and the scored splits "validation" and/or "test"}, as
        `datasets.run_splits(config)` names them.

    Returns:
      {"heldout_stage1_loss": {"initial", "final"}, "heldout_split": the split it used,
      "linear_eval": test metrics,
      "random_init": test metrics (if `linear_eval.random_init_baseline`), "classifier": the
      jointly trained classifier's test metrics (`method = "joint"`: end-to-end fine-tuning,
      the same keys as "linear_eval"), "validation": {"linear_eval", "classifier"} metrics on
      the validation split (when there is one), "stage2_seconds"}. Test entries are absent
      when test is not scored (`eval_split = "validation"`). The held-out loss uses the
      validation split when there is one, else test.
    """
    start = time.time()
    train = data["train"]
    scored: dict[str, dict[str, Any]] = {
        split: data[split] for split in ("validation", "test") if split in data
    }
    initial_model = objectives.create_model(config, train["labels"].shape[1])
    nnx.update(initial_model, replicate(nnx.state(initial_model), mesh))
    heldout_split = next(iter(scored))
    heldout = HeldoutLoss(config, mesh, scored[heldout_split])
    results: dict[str, Any] = {
        "heldout_stage1_loss": {"initial": heldout(initial_model), "final": heldout(model)},
        "heldout_split": heldout_split,
    }
    probe = LinearProbe(config, mesh)
    probed = {"linear_eval": model}
    if config.linear_eval.random_init_baseline:
        probed["random_init"] = initial_model
    for name, probed_model in probed.items():
        for split, outcome in probe(probed_model, train, scored).items():
            split_results = results if split == "test" else results.setdefault(split, {})
            split_results[name] = outcome.metrics
            prefix = name if split == "test" else f"{split}/{name}"
            writer.write_scalars(
                config.num_train_steps, {f"{prefix}/{k}": v for k, v in outcome.metrics.items()}
            )
            if name != "linear_eval":
                continue
            classifier_scores = None
            if config.method == "joint":
                classifier_scores = joint_classifier_scores(model, outcome.features, mesh)
                metrics = evaluation.multilabel_metrics(classifier_scores, scored[split]["labels"])
                split_results["classifier"] = metrics
                prefix = "classifier" if split == "test" else f"{split}/classifier"
                writer.write_scalars(
                    config.num_train_steps, {f"{prefix}/{k}": v for k, v in metrics.items()}
                )
            if (
                split == "test"
                and config.linear_eval.save_test_outputs
                and output_dir is not None
                and jax.process_index() == 0
            ):
                save_test_outputs(
                    Path(output_dir) / "test_outputs.npz",
                    outcome,
                    train,
                    data["test"],
                    classifier_scores,
                )
    results["stage2_seconds"] = time.time() - start
    return results


def write_results(workdir: Path, results: dict) -> None:
    """Writes `results` to `workdir/results.json`."""
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def plot_training_curve(config: ml_collections.ConfigDict, curve: list[dict], path: Path) -> None:
    """The logged interval-mean loss and the learning rate against the step."""
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (
        config.method
        if config.method == "bce"
        else f"{config.loss.positives} loss, τ={config.loss.temperature}"
    )
    steps = [entry["step"] for entry in curve]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [entry["train/loss"] for entry in curve])
    ax_loss.set(xlabel="step", ylabel="training loss (interval mean)", title=title)
    ax_lr.plot(steps, [entry["train/learning_rate"] for entry in curve])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    config, _ = checkpointing.stored_config(workdir)
    mesh = data_parallel_mesh()
    data = datasets.load_splits(config.dataset, datasets.run_splits(config))
    train_state = objectives.create_train_state(config, data["train"]["labels"].shape[1], mesh)
    step, state = checkpointing.restore_newest(workdir, objectives.checkpoint_state(*train_state))
    objectives.restore_train_state(state, *train_state)
    model = train_state[0]
    is_chief = jax.process_index() == 0
    if output_dir is not None and is_chief:
        output_dir.mkdir(parents=True, exist_ok=True)
    writer = metric_writers.create_default_writer(output_dir, just_logging=not is_chief)
    results = {"evaluated_step": step, "config": config.to_dict()}
    results |= evaluate(config, model, data, mesh, output_dir, writer)
    writer.close()
    if output_dir is not None and is_chief:
        write_results(output_dir, results)
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
