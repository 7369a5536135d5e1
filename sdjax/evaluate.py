"""Evaluation of a trained model, at the end of training or on any workdir's checkpoint.

COMMAND:
  python -m sdjax.evaluate --workdir workdirs/default   # the newest checkpoint, its own config
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from flax import nnx

from sdjax import checkpointing, evaluation, input_pipeline, metric_writers, objectives
from sdjax.evaluators import HeldoutLoss, LinearProbe, joint_classifier_scores, save_test_outputs
from sdjax.sharding import data_parallel_mesh, replicate


def evaluate(
    config: ml_collections.ConfigDict, model, data: dict[str, dict], mesh, workdir: Path, writer
) -> dict:
    """Held-out stage-1 loss (initial and final), linear probes and, if asked, test outputs.

    Args:
      data: {"train": arrays, and the scored splits "validation" and/or "test"}, as
        `input_pipeline.run_splits(config)` names them.

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
    scored = {split: data[split] for split in ("validation", "test") if split in data}
    initial_model = objectives.create_model(config, train["labels"].shape[1])
    nnx.update(initial_model, replicate(nnx.state(initial_model), mesh))
    heldout_split = next(iter(scored))
    heldout = HeldoutLoss(config, mesh, scored[heldout_split])
    results = {
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
                and jax.process_index() == 0
            ):
                save_test_outputs(
                    workdir / "test_outputs.npz", outcome, train, data["test"], classifier_scores
                )
    results["stage2_seconds"] = time.time() - start
    return results


def write_results(workdir: Path, results: dict) -> None:
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


def evaluate_workdir(workdir: str | Path) -> dict:
    """Restores the newest checkpoint of `workdir` with its stored config and evaluates it.

    Writes results.json (with `evaluated_step`) and the TensorBoard scalars into `workdir`.
    """
    workdir = Path(workdir)
    config, step = checkpointing.stored_config(workdir)
    mesh = data_parallel_mesh()
    data = input_pipeline.load_splits(config.dataset, input_pipeline.run_splits(config))
    train_state = objectives.create_train_state(config, data["train"]["labels"].shape[1], mesh)
    state = objectives.checkpoint_state(*train_state)
    objectives.restore_train_state(checkpointing.restore_state(workdir, step, state), *train_state)
    model = train_state[0]
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() != 0)
    results = {"evaluated_step": step, "config": config.to_dict()}
    results |= evaluate(config, model, data, mesh, workdir, writer)
    writer.close()
    if jax.process_index() == 0:
        write_results(workdir, results)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        results = evaluate_workdir(flags.FLAGS.workdir)
    except (FileNotFoundError, input_pipeline.MissingExtra) as error:
        print(error, file=sys.stderr)
        return 2
    logging.info("Evaluated checkpoint %d.", results["evaluated_step"])
    shown = ("linear_eval", "random_init", "classifier", "validation")
    print(json.dumps({k: results[k] for k in shown if k in results}))
    return 0


if __name__ == "__main__":  # flags here: the trainer imports this module and has its own
    flags.DEFINE_string("workdir", None, "A training workdir with checkpoints.", required=True)
    app.run(main)
