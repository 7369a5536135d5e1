"""The experiment suite: does S-D beat its baselines? Comparison, ablation, temperature, long tail
and the embedding picture, on every embedded dataset.

Every run is one `sdjax.train.train_and_evaluate` call; its result goes to one JSON file under
<results_dir>/<profile>/runs/, and a run whose file exists is skipped, so an interrupted suite
continues where it stopped. When a call finishes the last missing run of the profile, the report
(tables, significance, figures) is built from the result files into <results_dir>/<profile>/;
after a subset (`--sections`, `--datasets`) nothing is reported. experiments/README.md changes
only through `python -m experiments.experiment_report`.

COMMAND:
  python -m experiments.run_experiments --profile=quick --results_dir=/tmp/suite  # <= 60 min
  python -m experiments.run_experiments --profile=full --results_dir=/tmp/suite   # resumable
  python -m experiments.run_experiments --profile=quick --dry_run   # list the runs, done or to do
  python -m experiments.experiment_report --profiles=full   # the README's tables from the files

The default --results_dir holds the committed results, which are complete: nothing runs there.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import experiment_report
from experiments.suite import (
    COMMON_OVERRIDES,
    CONFIG_FILES,
    PROFILES,
    TSNE_DATASET,
    TSNE_METHODS,
    TSNE_POINTS,
    Run,
    hardware_name,
    missing_runs,
    plan,
    result_path,
)

EXPERIMENTS = Path(__file__).resolve().parent

FLAGS = flags.FLAGS
flags.DEFINE_enum("profile", "quick", list(PROFILES), "Which budget to run.")
flags.DEFINE_string("results_dir", str(EXPERIMENTS / "results"), "Where result files go.")
flags.DEFINE_string("workdir", str(EXPERIMENTS / "workdirs"), "Scratch space for checkpoints.")
flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")
flags.DEFINE_bool("dry_run", False, "Only list the planned runs, each as done or to do.")
flags.DEFINE_list("sections", [], "Run only these sections (default: all).")
flags.DEFINE_list("datasets", [], "Run only these datasets (default: all).")


def run_config(profile: str, run: Run, data_dir: str):
    from sdjax import config_lib

    config_profile = PROFILES[profile]["config_profile"]
    config = config_lib.load_config_file(CONFIG_FILES[run.dataset], config_profile)
    overrides = {
        **COMMON_OVERRIDES,
        **run.config_overrides(),
        "seed": run.seed,
        "dataset.data_dir": data_dir,
    }
    return config_lib.override(config, **overrides)


def execute(profile: str, run: Run, results_dir: Path, workdir_root: Path, data_dir: str):
    """Trains and evaluates `run`, then writes its result file (and t-SNE inputs if wanted)."""

    from sdjax import evaluation, train

    config = run_config(profile, run, data_dir)
    workdir = workdir_root / profile / run.name
    start = time.time()
    results = train.train_and_evaluate(config, workdir)
    outputs = np.load(workdir / "test_outputs.npz")
    scores, labels = outputs["scores"].astype(np.float32), outputs["labels"]
    groups = evaluation.frequency_groups(outputs["train_label_counts"])
    record = {
        "run": dataclasses.asdict(run),
        "profile": profile,
        "linear_eval": results["linear_eval"],
        **({"classifier": results["classifier"]} if "classifier" in results else {}),
        "final_train_loss": results["final_train_loss"],
        "heldout_stage1_loss": results["heldout_stage1_loss"],
        "train_label_counts": outputs["train_label_counts"].astype(int).tolist(),
        "label_groups": {g: v.tolist() for g, v in groups.items()},
        "group_bootstrap": evaluation.bootstrap_group_metrics(scores, labels, groups),
        "wall_seconds": time.time() - start,
        "hardware": hardware_name(),
        "config": f"configs/{CONFIG_FILES[run.dataset]}.py:{PROFILES[profile]['config_profile']}",
    }
    # The embedding picture: seed 0 of each pictured loss, pre-training setting, default τ.
    if run.method in TSNE_METHODS and run == Run(TSNE_DATASET, run.method, 0):
        path = results_dir / "embeddings" / f"{run.dataset}_{run.method}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            features=outputs["features"][:TSNE_POINTS],
            labels=labels[:TSNE_POINTS],
        )
    path = result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written last and atomically: a file exists only for a finished run.
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)
    shutil.rmtree(workdir, ignore_errors=True)  # checkpoints are no longer needed
    return record


def main(argv):
    del argv
    results_dir = Path(FLAGS.results_dir) / FLAGS.profile
    import jax

    # Runs that differ only in the loss share the probe's and the encoder's compiled programs.
    jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # Two passes: the temperature sweep is planned once the comparison has picked a baseline.
    finished = 0
    for _ in range(2):
        runs = plan(FLAGS.profile, results_dir, FLAGS.sections, FLAGS.datasets)
        pending = [r for r in runs if not result_path(results_dir, r).exists()]
        print(f"{len(runs)} runs planned, {len(pending)} to do.", flush=True)
        if FLAGS.dry_run:
            print("\n".join(f"{'to do' if r in pending else 'done':6} {r.name}" for r in runs))
            return
        suite_start = time.time()
        for i, run in enumerate(pending):
            record = execute(FLAGS.profile, run, results_dir, Path(FLAGS.workdir), FLAGS.data_dir)
            finished += 1
            elapsed = time.time() - suite_start
            eta = elapsed / (i + 1) * (len(pending) - i - 1)
            print(
                f"[{i + 1}/{len(pending)}] {run.name}: mAP "
                f"{run.score(record)['mAP']:.4f} in {record['wall_seconds']:.0f} s; "
                f"ETA {eta / 60:.0f} min",
                flush=True,
            )
    missing = missing_runs(FLAGS.profile, results_dir)
    if missing:
        print(experiment_report.incomplete_profile_message(FLAGS.profile, results_dir, missing))
    elif finished:  # a report of results that this call completed; otherwise it is as it was
        logging.set_verbosity(logging.WARNING)
        experiment_report.write_report(FLAGS.profile, results_dir)
        print(
            f"wrote {results_dir / 'report.md'}; `python -m experiments.experiment_report "
            f"--profiles={FLAGS.profile} --results_dir={results_dir.parent}` rebuilds it.",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
