"""Why debtags' joint classifiers trail probes on their own encoders: remedies, on validation.

In the protocol's rehearsal (`protocol_quick`) every debtags `joint` classifier scored 0.08-0.15
validation mAP below a linear probe fitted on its own frozen encoder. This trains
configs/debtags_joint.py at its own budget (S-D, 1,000 steps, one seed, validation scoring:
test is never loaded) once per remedy and records both scores:

- `baseline`: the config as it is;
- `classifier_rate_10x`: the classifier's learning rate 10x the encoder's;
- `classifier_not_decayed`: no weight decay on the classifier (AdamW decays kernels at 0.1);
- both together;
- `classifier_without_dropout`: the classifier reads the encoder with dropout off (a second
  pass of the same views), as the probe does, and with a 10x rate;
- `classifier_detached`: the classifier's gradient stops at the features, so it is a head
  trained online on a pure S-D encoder (alone and with a 10x rate): the gap that remains is
  the online head's, not the encoder's.
- `probe_unstandardised`: the baseline, its probe fitted on the features as they are, as the
  joint classifier reads them, rather than standardised with training statistics.

Then, from the baseline's final checkpoint, how well each classifier fits the training split
against how well it scores validation: the joint classifier, the probe, and the probe on
unstandardised features (`results/joint_head_fit.json`).

The remedies that need code patch, for this diagnosis only, `Joint.outputs` (what the
classifier reads), `create_optimizer` (with a decay mask that leaves the classifier out) or the
probe's `standardisation`; the library's behaviour is unchanged. Results accumulate in
`results/joint_head.json` (a finished remedy is skipped, so an interrupted run continues) and
`results/joint_head.md`. About 3 minutes a remedy on the 2-core CPU, 30 minutes in all.

COMMAND:
  python -m experiments.joint_head
"""

from __future__ import annotations

# The restart comes before the imports, which it would otherwise run twice.
from sdjax import host_memory

if __name__ == "__main__":
    host_memory.restart_with_huge_pages()

import contextlib
import dataclasses
import datetime
import functools
import json
import time
from pathlib import Path
from unittest import mock

import jax
import numpy as np
from absl import app, flags

from experiments.suite import COMMON_OVERRIDES, hardware_name

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 1000  # the protocol's tuning seed
FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined when run as a script, not on import: the tests import this module beside
    `sdjax.main`, which defines its own `--workdir`."""
    flags.DEFINE_string("workdir", str(RESULTS.parent / "workdirs" / "joint_head"), "Checkpoints.")
    flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")


@dataclasses.dataclass(frozen=True)
class Remedy:
    classifier_rate: float | None = None  # a multiple of the encoder's; None: the config's
    decay_classifier: bool = True
    classifier_reads: str = "features"  # or "features_without_dropout", "detached"
    standardise_probe: bool = True


REMEDIES = {
    "baseline": Remedy(),
    "classifier_rate_10x": Remedy(classifier_rate=10.0),
    "classifier_not_decayed": Remedy(decay_classifier=False),
    "classifier_rate_10x_not_decayed": Remedy(classifier_rate=10.0, decay_classifier=False),
    "classifier_without_dropout": Remedy(classifier_reads="features_without_dropout"),
    "classifier_without_dropout_rate_10x": Remedy(
        classifier_rate=10.0, classifier_reads="features_without_dropout"
    ),
    "classifier_detached": Remedy(classifier_reads="detached"),
    "classifier_detached_rate_10x": Remedy(classifier_rate=10.0, classifier_reads="detached"),
    "probe_unstandardised": Remedy(standardise_probe=False),
}


def joint_outputs(reads: str):
    """A `Joint.outputs` whose classifier reads the encoder as `reads` says."""
    from sdjax import models

    def outputs(self, model, inputs):
        features = model.encode(inputs)
        if reads == "features_without_dropout":
            classified = models.evaluation_view(model).encode(inputs)
        elif reads == "detached":
            classified = jax.lax.stop_gradient(features)
        else:
            classified = features
        return {"embeddings": model.head(features), "logits": model.classifier(classified)}

    return outputs


def decayed_outside_classifier(params):
    """A `create_optimizer` decay mask: every matrix except the classifier's parameters."""
    from sdjax import objectives

    return jax.tree.map(
        lambda matrix, classifier: matrix and not classifier,
        objectives.matrix_parameters(params),
        objectives.classifier_parameters(params),
    )


def features_as_they_are(train_features):
    """A `linear_probe.standardisation` that leaves the features as they are."""
    return np.zeros(train_features.shape[1]), np.ones(train_features.shape[1])


def run_remedy(name: str, workdir: Path, data_dir: str) -> dict:
    from experiments import budgets
    from experiments.suite import CONFIG_FILES
    from sdjax import config_lib, objectives, train
    from sdjax.evaluators import linear_probe

    remedy = REMEDIES[name]
    config = budgets.load_config(CONFIG_FILES["debtags"], "")
    overrides = {
        **COMMON_OVERRIDES,
        "method": "joint",
        "loss.positives": "sd",
        "seed": SEED,
        "eval_split": "validation",
        "dataset.validation": True,
        "dataset.data_dir": data_dir,
    }
    if remedy.classifier_rate:
        rate = remedy.classifier_rate * config.optimizer.learning_rate
        overrides["optimizer.classifier_learning_rate"] = rate
    config = config_lib.override(config, **overrides)
    with contextlib.ExitStack() as patches:
        patches.enter_context(
            mock.patch.object(objectives.Joint, "outputs", joint_outputs(remedy.classifier_reads))
        )
        if not remedy.decay_classifier:
            optimizer = functools.partial(
                objectives.create_optimizer, decay_mask=decayed_outside_classifier
            )
            patched = mock.patch.object(objectives, "create_optimizer", optimizer)
            patches.enter_context(patched)
        if not remedy.standardise_probe:
            patched = mock.patch.object(linear_probe, "standardisation", features_as_they_are)
            patches.enter_context(patched)
        start = time.perf_counter()
        results = train.train_and_evaluate(config, workdir / name)
    return {
        "probe_standardised": remedy.standardise_probe,
        "classifier_rate_multiple": remedy.classifier_rate or 1.0,
        "classifier_decayed": remedy.decay_classifier,
        "classifier_reads": remedy.classifier_reads,
        "classifier_mAP": results["validation"]["classifier"]["mAP"],
        "probe_mAP": results["validation"]["linear_eval"]["mAP"],
        "seconds": round(time.perf_counter() - start),
        "hardware": hardware_name(),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def fit_against_validation(workdir: Path) -> dict:
    """Training and validation mAP of the joint classifier and of probes fitted with and
    without standardisation, on the features of the run in `workdir`; and how far the
    training features' per-feature means lie from 0, in standard deviations."""
    from sdjax import evaluate, metrics
    from sdjax.evaluators import joint_classifier, linear_probe

    run = evaluate.restore_workdir(workdir)
    probe = linear_probe.LinearProbe(run.config, run.mesh)
    splits = ("train", "validation")
    features = {split: probe.features(run.model, run.data[split]["inputs"]) for split in splits}
    scorers = {
        "joint classifier": lambda x: joint_classifier.joint_classifier_scores(
            run.model, x, run.mesh
        ),
        "probe": probe.fit(features["train"], run.data["train"]["labels"]),
    }
    with mock.patch.object(linear_probe, "standardisation", features_as_they_are):
        scorers["probe, unstandardised"] = probe.fit(features["train"], run.data["train"]["labels"])
    fit = {
        name: {
            split: metrics.multilabel_metrics(score(features[split]), run.data[split]["labels"])[
                "mAP"
            ]
            for split in splits
        }
        for name, score in scorers.items()
    }
    mean, std = features["train"].mean(axis=0), features["train"].std(axis=0)
    return {
        "mAP": fit,
        "median_abs_mean_over_std": float(np.median(np.abs(mean) / std)),
        "step": run.step,
    }


def write_table(records: dict, fit: dict | None, path: Path) -> None:
    lines = [
        "# Debtags joint classifiers against probes on their own encoders (validation)",
        "",
        "`python -m experiments.joint_head`: configs/debtags_joint.py at its own budget (S-D,",
        f"1,000 steps), seed {SEED}, scored on the validation split. One seed: probes spread by",
        "about ±0.004 between seeds (configs/debtags.py).",
        "",
        "| remedy | classifier rate (× encoder's) | classifier decayed | classifier reads "
        "| probe standardised | classifier mAP | probe mAP | classifier − probe |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for name, r in records.items():
        decayed = "yes" if r["classifier_decayed"] else "no"
        standardised = "yes" if r["probe_standardised"] else "no"
        lines.append(
            f"| {name} | {r['classifier_rate_multiple']:g} | {decayed} "
            f"| {r['classifier_reads']} | {standardised} "
            f"| {r['classifier_mAP']:.4f} | {r['probe_mAP']:.4f} "
            f"| {r['classifier_mAP'] - r['probe_mAP']:+.4f} |"
        )
    hardware = sorted({r["hardware"] for r in records.values()})
    lines += ["", f"Run on: {'; '.join(hardware)}."]
    if fit:
        lines += [
            "",
            f"## Fit against validation (the baseline's run, step {fit['step']})",
            "",
            "| classifier | training mAP | validation mAP |",
            "|---|---:|---:|",
            *(
                f"| {name} | {scores['train']:.4f} | {scores['validation']:.4f} |"
                for name, scores in fit["mAP"].items()
            ),
            "",
            "The training features' per-feature means lie a median "
            f"{fit['median_abs_mean_over_std']:.2f} standard deviations from 0.",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv):
    del argv
    json_path = RESULTS / "joint_head.json"
    records = json.loads(json_path.read_text()) if json_path.exists() else {}
    for name in REMEDIES:
        if name in records:
            continue
        print(f"{name}: training", flush=True)
        records[name] = run_remedy(name, Path(FLAGS.workdir), FLAGS.data_dir)
        json_path.write_text(json.dumps(records, indent=1) + "\n")
        write_table(records, None, RESULTS / "joint_head.md")
        print(f"{name}: {records[name]}", flush=True)
    fit_path = RESULTS / "joint_head_fit.json"
    if not fit_path.exists():
        fit = fit_against_validation(Path(FLAGS.workdir) / "baseline")
        fit_path.write_text(json.dumps(fit, indent=1) + "\n")
    write_table(records, json.loads(fit_path.read_text()), RESULTS / "joint_head.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
