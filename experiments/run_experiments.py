"""The experiment suite: does S-D beat its baselines? Comparison, ablation, temperature, long tail
and the embedding picture, on every embedded dataset.

Every run is one `sdjax.train.train_and_evaluate` call; its result goes to one JSON file under
<results_dir>/<profile>/runs/, and a run whose file exists is skipped, so an interrupted suite
continues where it stopped. When a call finishes the last missing run of the profile, the report
(tables, significance, figures) is built from the result files into <results_dir>/<profile>/;
after a subset (`--sections`, `--datasets`) nothing is reported. experiments/README.md changes
only through `python -m experiments.experiment_report`.

The protocol profiles (`protocol`, `protocol_quick`; experiments/protocol.py) run the tuning
protocol instead: every configuration of every entry on the validation split, then the
selected configuration of each with fresh seeds on test. Their runs go to
<results_dir>/<profile>/runs/{tuning,confirmation}/, each finished run appends a line to
<results_dir>/<profile>/ledger.jsonl, and the confirmation runs are planned as each entry's
tuning completes; the report comes from `experiments.protocol_report`.

COMMAND:
  python -m experiments.run_experiments --profile=protocol --dry_run  # the plan and its hours
  python -m experiments.run_experiments --profile=protocol            # ~12 h, resumable
  python -m experiments.run_experiments --profile=protocol_quick      # ~1 h, smaller grid
  python -m experiments.run_experiments --profile=protocol --rerun=<run>,...  # repeats here?
  python -m experiments.run_experiments --profile=quick --results_dir=/tmp/suite  # <= 60 min
  python -m experiments.run_experiments --profile=full --results_dir=/tmp/suite   # resumable
  python -m experiments.run_experiments --profile=quick --dry_run   # list the runs, done or to do
  python -m experiments.experiment_report --profiles=full   # the README's tables from the files

The default --results_dir holds the committed results, which are complete: nothing runs there.
"""

from __future__ import annotations

# The restart comes before the imports, which it would otherwise run twice.
from sdjax import host_memory

if __name__ == "__main__":
    host_memory.restart_with_huge_pages()

import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from experiments import budgets, experiment_report, protocol, protocol_report
from experiments.protocol import PROTOCOLS, ProtocolRun
from experiments.suite import (
    COMMON_OVERRIDES,
    CONFIG_FILES,
    PROFILES,
    TSNE_DATASET,
    TSNE_METHODS,
    TSNE_POINTS,
    Run,
    code_revision,
    hardware_name,
    missing_runs,
    plan,
    result_path,
)

EXPERIMENTS = Path(__file__).resolve().parent

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags. Defined when run as a script, not on import: the tests import
    this module beside `sdjax.main`, which defines its own `--workdir`."""
    flags.DEFINE_enum("profile", "quick", [*PROFILES, *PROTOCOLS], "Which budget to run.")
    flags.DEFINE_string("results_dir", str(EXPERIMENTS / "results"), "Where result files go.")
    flags.DEFINE_string("workdir", str(EXPERIMENTS / "workdirs"), "Scratch space for checkpoints.")
    flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")
    flags.DEFINE_bool("dry_run", False, "Only list the planned runs, each as done or to do.")
    flags.DEFINE_list("sections", [], "Run only these sections (default: all).")
    flags.DEFINE_list("datasets", [], "Run only these datasets (default: all).")
    flags.DEFINE_list(
        "rerun",
        [],
        "Protocol profiles: run these finished runs again, outside the ledger, and append "
        "then-and-now to reruns.jsonl (do runs repeat on this CPU?).",
    )
    flags.DEFINE_bool(
        "moco",
        False,
        "Protocol profiles: add the MoCo setting, exploratory only "
        "(experiments/protocol.py says why).",
    )


def run_config(profile: str, run: Run, data_dir: str):
    from sdjax import config_lib

    config = budgets.load_config(CONFIG_FILES[run.dataset], PROFILES[profile]["config_profile"])
    overrides = {
        **COMMON_OVERRIDES,
        **run.config_overrides(),
        "seed": run.seed,
        "dataset.data_dir": data_dir,
        "evals.long_tail": True,
    }
    return config_lib.override(config, **overrides)


def execute(profile: str, run: Run, results_dir: Path, workdir_root: Path, data_dir: str):
    """Trains and evaluates `run`, then writes its result file (and t-SNE inputs if wanted)."""

    from sdjax import train

    config = run_config(profile, run, data_dir)
    workdir = workdir_root / profile / run.name
    start = time.time()
    results = train.train_and_evaluate(config, workdir)
    record = {
        "run": dataclasses.asdict(run),
        "profile": profile,
        "linear_eval": results["linear_eval"],
        **({"classifier": results["classifier"]} if "classifier" in results else {}),
        "final_train_loss": results["final_train_loss"],
        "heldout_stage1_loss": results["heldout_stage1_loss"],
        **results["long_tail"],  # train_label_counts, label_groups, group_bootstrap
        "wall_seconds": time.time() - start,
        "hardware": hardware_name(),
        "config": f"configs/{CONFIG_FILES[run.dataset]}.py:{PROFILES[profile]['config_profile']}",
    }
    # The embedding picture: seed 0 of each pictured loss, pre-training setting, default τ.
    if run.method in TSNE_METHODS and run == Run(TSNE_DATASET, run.method, 0):
        path = results_dir / "embeddings" / f"{run.dataset}_{run.method}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs = np.load(workdir / "test_outputs.npz")
        np.savez_compressed(
            path,
            features=outputs["features"][:TSNE_POINTS],
            labels=outputs["labels"][:TSNE_POINTS],
        )
    path = result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written last and atomically: a file exists only for a finished run.
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)
    shutil.rmtree(workdir, ignore_errors=True)  # checkpoints are no longer needed
    return record


def protocol_config(profile: str, run: ProtocolRun, data_dir: str):
    """(config, knob values, overrides) of a neural protocol run."""
    from sdjax import config_lib

    config = budgets.load_config(CONFIG_FILES[run.dataset], PROTOCOLS[profile].config_profile)
    budget = PROTOCOLS[profile].budgets[run.dataset]
    knobs = protocol.configurations(run.dataset, run.setting, run.entry, budget.num_configs)[
        run.config_id
    ]
    overrides = protocol.config_overrides(run.dataset, run.setting, run.entry, knobs, config)
    config = config_lib.override(
        config,
        **COMMON_OVERRIDES,
        **overrides,
        seed=run.seed,
        eval_split="validation" if run.stage == "tuning" else "test",
        **{"dataset.data_dir": data_dir, "dataset.validation": True},
    )
    return config, knobs, overrides


def text_reference_results(profile: str, run: ProtocolRun, knobs: dict, data_dir: str):
    """The TF-IDF reference's metrics and float32 scores on the protocol's splits, cut to the
    example limits of the profile's debtags config, as the neural runs' are."""
    from experiments import text_reference
    from sdjax import metrics
    from sdjax.datasets import debtags

    dataset = budgets.load_config(
        CONFIG_FILES[run.dataset], PROTOCOLS[profile].config_profile
    ).dataset
    roles = {"train": "train_without_validation", "validation": "validation"}
    if run.stage == "confirmation":
        roles["test"] = "test"
    corpus, _ = debtags.corpus(data_dir, dataset.source_dir, roles.values())
    limits = {
        role: dataset.train_examples if role == "train" else dataset.test_examples for role in roles
    }
    texts, labels = {}, {}
    for role, split in roles.items():
        split_texts, split_labels = corpus[split]
        limit = limits[role] or len(split_labels)
        texts[role], labels[role] = split_texts[:limit], split_labels[:limit]
    train_texts, train_labels = texts.pop("train"), labels.pop("train")
    scores, _ = text_reference.tfidf_scores(train_texts, train_labels, texts, **knobs)
    scores = {role: value.astype(np.float32) for role, value in scores.items()}
    scored = {role: metrics.multilabel_metrics(scores[role], labels[role]) for role in scores}
    return scored, scores, labels


@functools.cache
def code_at_start() -> str:
    """The code's git commit (`code_revision`) when this process first asked, which `main` does
    first: the code it imported, even if the checkout changes while runs go on."""
    return code_revision()


def data_digest(profile: str, dataset: str, data_dir: str) -> str | None:
    """The SHA-256 of a dataset's prepared examples where they depend on the machine (debtags:
    its apt lists); None where they come from files that a pinned package ships."""
    if dataset != "debtags":
        return None
    from sdjax.datasets import debtags

    config = budgets.load_config(CONFIG_FILES[dataset], PROTOCOLS[profile].config_profile)
    return debtags.digest(data_dir, config.dataset.source_dir)


def execute_protocol_run(
    profile: str,
    run: ProtocolRun,
    results_dir: Path,
    workdir_root: Path,
    data_dir: str,
    data_sha256: str | None = None,
) -> dict:
    """Runs one protocol run, writes its result file and appends it to the ledger.

    A tuning run scores the validation split only; a confirmation run also scores test, keeps
    the scorer's float32 test scores (<results>/test_scores/<run>.npz) and the mAP of every
    test resample. `data_sha256` (`data_digest`) and the code's git commit (`code_at_start`) go
    into the record and the ledger.
    """
    from sdjax import metrics, train

    start = time.time()
    scorer = run.scorer
    budget = PROTOCOLS[profile].budgets[run.dataset]
    record = {
        "name": run.name,
        "run": dataclasses.asdict(run),
        "profile": profile,
        "code_revision": code_at_start(),
    }
    if data_sha256:
        record["data_sha256"] = data_sha256
    if run.entry == protocol.TEXT_REFERENCE:
        knobs = protocol.configurations(run.dataset, run.setting, run.entry, budget.num_configs)[
            run.config_id
        ]
        scored, scores, labels = text_reference_results(profile, run, knobs, data_dir)
        record |= {
            "knobs": knobs,
            "overrides": knobs,
            "validation": {scorer: scored["validation"]},
        }
        if run.stage == "confirmation":
            record["test"] = {scorer: scored["test"]}
            test_scores, test_labels = scores["test"], labels["test"]
    else:
        config, knobs, overrides = protocol_config(profile, run, data_dir)
        workdir = workdir_root / profile / run.name
        results = train.train_and_evaluate(config, workdir)
        if run.stage == "tuning" and "linear_eval" in results:
            raise RuntimeError(f"{run.name}: a tuning run scored test; it must not.")
        record |= {
            "knobs": knobs,
            "overrides": overrides,
            "validation": results["validation"],
            "final_train_loss": results["final_train_loss"],
            "heldout_stage1_loss": results["heldout_stage1_loss"],
            "heldout_split": results["heldout_split"],
        }
        if run.stage == "confirmation":
            record["test"] = {k: results[k] for k in ("linear_eval", "classifier") if k in results}
            outputs = np.load(workdir / "test_outputs.npz")
            test_scores = outputs["classifier_scores" if scorer == "classifier" else "scores"]
            test_labels = outputs["labels"]
        shutil.rmtree(workdir, ignore_errors=True)  # checkpoints are no longer needed
    record["scored_by"] = scorer
    record["validation_mAP"] = record["validation"][scorer]["mAP"]
    if run.stage == "confirmation":
        record["test_mAP"] = record["test"][scorer]["mAP"]
        record["test_bootstrap_mAP"] = metrics.bootstrap_mean_average_precision(
            test_scores, test_labels, num_resamples=PROTOCOLS[profile].bootstrap_resamples
        ).tolist()
        scores_path = results_dir / "test_scores" / f"{run.name}.npz"
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            scores_path,
            scores=np.asarray(test_scores, np.float32),
            labels=np.asarray(test_labels, np.uint8),
        )
    record |= {
        "wall_seconds": time.time() - start,
        "hardware": hardware_name(),
        "config": f"configs/{CONFIG_FILES[run.dataset]}.py:{PROTOCOLS[profile].config_profile}",
    }
    path = protocol.result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)
    protocol.append_to_ledger(results_dir, record)
    return record


def dry_run_listing(profile: str, results_dir: Path, datasets, moco: bool) -> str:
    """Every planned run as done or to do with its estimated time, the confirmation runs that
    wait for tuning, and the estimated hours left."""
    runs, waiting = protocol.plan(profile, results_dir, datasets, moco)
    lines, seconds_left = [], 0.0
    for run in runs:
        done = protocol.result_path(results_dir, run).exists()
        estimate = protocol.estimated_seconds(profile, run)
        seconds_left += 0 if done else estimate
        lines.append(f"{'done' if done else 'to do':6} {run.name}  (~{estimate:.0f} s)")
    seeds = PROTOCOLS[profile].confirmation_seeds
    for cell in waiting:
        count = 1 if cell[2] == protocol.TEXT_REFERENCE else len(seeds)
        estimate = count * protocol.estimated_seconds(profile, None, cell)
        seconds_left += estimate
        lines.append(
            f"later  confirmation/{'/'.join(cell)}/<selected>: {count} seed(s), ~{estimate:.0f} s"
        )
    header = (
        f"{PROTOCOLS[profile].description}\n{len(runs)} runs planned now "
        f"({sum(not protocol.result_path(results_dir, r).exists() for r in runs)} to do), "
        f"{len(waiting)} entries' confirmation waiting for their tuning; estimated "
        f"{seconds_left / 3600:.1f} h left on the 2-core CPU."
    )
    return header + "\n" + "\n".join(lines)


def rerun_protocol_runs(
    profile: str, names: list[str], results_dir: Path, workdir_root: Path, data_dir: str
) -> list[dict]:
    """Runs finished protocol runs again on this machine, outside the ledger and the results,
    and appends to `protocol.RERUNS` what each gave then and now: whether a run repeats, on the
    same CPU model or another."""
    import tempfile

    ledger = {row["run"]: row for row in protocol.read_ledger(results_dir)}
    for name in names:  # all checked before any trains: a run takes minutes
        if name not in ledger:
            raise ValueError(f"`--rerun`: got {name!r}, expected a run in {profile}'s ledger.")
    comparisons = []
    for name in names:
        row = ledger[name]
        run = ProtocolRun(*(row[field.name] for field in dataclasses.fields(ProtocolRun)))
        then = protocol.load_result(results_dir, run)
        with tempfile.TemporaryDirectory() as scratch:
            now = execute_protocol_run(
                profile, run, Path(scratch) / "results", workdir_root, data_dir
            )
        comparison = {
            "run": name,
            "hardware": [then["hardware"], now["hardware"]],
            "code_revision": [then.get("code_revision", "unrecorded"), now["code_revision"]],
        }
        for key in ("validation_mAP", "test_mAP", "final_train_loss"):
            if key in then:
                comparison[key] = [then[key], now[key]]
        if "heldout_stage1_loss" in then:
            comparison["initial_heldout_loss"] = [
                record["heldout_stage1_loss"]["initial"] for record in (then, now)
            ]
        protocol.append_line(results_dir / protocol.RERUNS, comparison)
        comparisons.append(comparison)
        print(f"rerun {name}: {json.dumps(comparison)}", flush=True)
    return comparisons


def run_protocol(profile: str, results_dir: Path) -> None:
    datasets, moco = FLAGS.datasets, FLAGS.moco
    if FLAGS.rerun:
        rerun_protocol_runs(profile, FLAGS.rerun, results_dir, Path(FLAGS.workdir), FLAGS.data_dir)
        return
    if FLAGS.dry_run:
        print(dry_run_listing(profile, results_dir, datasets, moco), flush=True)
        return
    finished, digests = 0, {}
    while True:  # confirmation runs become known as tuning completes
        runs, waiting = protocol.plan(profile, results_dir, datasets, moco)
        pending = [r for r in runs if not protocol.result_path(results_dir, r).exists()]
        print(f"{len(runs)} runs planned, {len(pending)} to do.", flush=True)
        if not pending:
            break
        for dataset in {run.dataset for run in pending} - set(digests):
            digests[dataset] = data_digest(profile, dataset, FLAGS.data_dir)
            protocol.check_data(protocol.read_ledger(results_dir), dataset, digests[dataset])
        start = time.time()
        for i, run in enumerate(pending):
            record = execute_protocol_run(
                profile, run, results_dir, Path(FLAGS.workdir), FLAGS.data_dir, digests[run.dataset]
            )
            finished += 1
            eta = (time.time() - start) / (i + 1) * (len(pending) - i - 1)
            print(
                f"[{i + 1}/{len(pending)}] {run.name}: validation mAP "
                f"{record['validation_mAP']:.4f} in {record['wall_seconds']:.0f} s; "
                f"ETA {eta / 60:.0f} min (of this pass)",
                flush=True,
            )
    if waiting or datasets:
        print("Not reporting: the profile is not complete in this call's datasets.", flush=True)
    elif finished:
        logging.set_verbosity(logging.WARNING)
        protocol_report.write_report(profile, results_dir)
        print(f"wrote {results_dir / 'report.md'}", flush=True)


def main(argv):
    del argv
    code_at_start()
    results_dir = Path(FLAGS.results_dir) / FLAGS.profile
    import jax

    # Runs that differ only in the loss share the probe's and the encoder's compiled programs:
    # in the cache that JAX_COMPILATION_CACHE_DIR names, else in the workdir's.
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path(FLAGS.workdir) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if FLAGS.profile in PROTOCOLS:
        run_protocol(FLAGS.profile, results_dir)
        return
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
    define_flags()
    app.run(main)
