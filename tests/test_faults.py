"""One test per fault of issue 13: each asserts the outcome a user gets, not the absence of a
crash."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from test_experiments import suite, write

# --------------------------------------------------------------------------------------------
# Trainer: workdir, checkpoints, config errors, multi-host
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Data sources and the experiment runner
# --------------------------------------------------------------------------------------------

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# Runs the suite's runner with `execute` (the training of one run) replaced by a fake result.
RUN_WITH_FAKE_TRAINING = """
import sys
from absl import app
sys.path.insert(1, sys.argv.pop(1))  # tests/, after the working directory (the copy's parent)
from experiments import run_experiments
from test_experiments import write

def execute(profile, run, results_dir, workdir_root, data_dir):
    write(results_dir, run, 0.5)
    return {"linear_eval": {"mAP": 0.5}, "wall_seconds": 0.0}

run_experiments.execute = execute
app.run(run_experiments.main)
"""


def experiments_copy(tmp_path) -> Path:
    """The experiments package with its README and the committed quick report, to run the entry
    points in (from its parent): what they write next to themselves lands in the copy, never in
    the checkout."""
    copy = tmp_path / "experiments"
    (copy / "results" / "quick").mkdir(parents=True)
    for path in [*EXPERIMENTS.glob("*.py"), EXPERIMENTS / "README.md"]:
        shutil.copy(path, copy)
    shutil.copy(EXPERIMENTS / "results" / "quick" / "report.md", copy / "results" / "quick")
    return copy


def run_entry_point(copy, name, *args, fake_training=False):
    if fake_training:
        command = ["-c", RUN_WITH_FAKE_TRAINING, str(Path(__file__).parent)]
    else:
        command = ["-m", f"experiments.{name}"]
    return subprocess.run(
        [sys.executable, *command, *args],
        capture_output=True,
        text=True,
        cwd=copy.parent,
        env={**os.environ, "PYTHONPATH": str(EXPERIMENTS.parent)},
        timeout=300,
    )


def write_fake_profile(results_dir, profile="quick", skip=()):
    """A result file for every run of `profile` but `skip`; the second pass adds the temperature
    sweep of the baseline that the comparison picked."""
    for _ in range(2):
        for run in suite.plan(profile, results_dir, []):
            if run not in skip:
                write(results_dir, run, 0.5)


def test_runner_on_a_subset_writes_no_report_and_leaves_tracked_files_alone(tmp_path):
    copy = experiments_copy(tmp_path)
    tracked = [copy / "README.md", copy / "results" / "quick" / "report.md"]
    before = [path.read_bytes() for path in tracked]
    custom = tmp_path / "custom"
    for results_dir in (custom, copy / "results"):  # a custom directory, then the committed one
        done = run_entry_point(
            copy,
            "run_experiments",
            "--profile=quick",
            f"--results_dir={results_dir}",
            f"--workdir={tmp_path / 'work'}",
            "--datasets=yeast",
            "--sections=comparison",
            fake_training=True,
        )
        assert done.returncode == 0, done.stderr
        assert [path.read_bytes() for path in tracked] == before
        assert "18 runs planned, 18 to do." in done.stdout  # 6 losses x 3 seeds
        assert "incomplete: 102 of 120 runs have no result file" in done.stdout
        assert len(list((results_dir / "quick" / "runs").rglob("*.json"))) == 18
    assert sorted(p.name for p in (custom / "quick").iterdir()) == ["runs"]
    assert sorted(p.name for p in (copy / "results" / "quick").iterdir()) == ["report.md", "runs"]


def test_runner_finishing_a_profile_reports_into_its_own_results_dir(tmp_path):
    copy = experiments_copy(tmp_path)
    readme = (copy / "README.md").read_bytes()
    custom = tmp_path / "custom"
    write_fake_profile(custom / "quick", skip={suite.Run("yeast", "sd", 0)})
    done = run_entry_point(
        copy,
        "run_experiments",
        "--profile=quick",
        f"--results_dir={custom}",
        f"--workdir={tmp_path / 'work'}",
        fake_training=True,
    )
    assert done.returncode == 0, done.stderr
    assert "120 runs planned, 1 to do." in done.stdout
    report = (custom / "quick" / "report.md").read_text()
    assert report.startswith("## Results: the `quick` profile\n\n120 finished runs, 0.07 h")
    assert (copy / "README.md").read_bytes() == readme


def test_report_command_needs_a_complete_profile_and_the_committed_dir_for_the_readme(tmp_path):
    copy = experiments_copy(tmp_path)
    readme = (copy / "README.md").read_text()
    committed_report = (copy / "results" / "quick" / "report.md").read_text()
    missing = suite.Run("yeast", "sd", 0)
    write_fake_profile(copy / "results" / "quick", skip={missing})
    done = run_entry_point(copy, "experiment_report", "--profiles=quick")
    assert done.returncode == 1
    assert "incomplete: 1 of 120 runs have no result file (e.g. yeast/sd_t0.1_s0)" in done.stderr
    assert (copy / "README.md").read_text() == readme
    assert (copy / "results" / "quick" / "report.md").read_text() == committed_report

    custom = tmp_path / "custom"
    write_fake_profile(custom / "quick")
    done = run_entry_point(copy, "experiment_report", "--profiles=quick", f"--results_dir={custom}")
    assert done.returncode == 0, done.stderr
    assert (custom / "quick" / "report.md").read_text().startswith("## Results: the `quick`")
    assert (copy / "README.md").read_text() == readme

    write(copy / "results" / "quick", missing, 0.5)
    done = run_entry_point(copy, "experiment_report", "--profiles=quick")
    assert done.returncode == 0, done.stderr
    report = (copy / "results" / "quick" / "report.md").read_text()
    assert report != committed_report and "120 finished runs" in report
    begin, end = "<!-- report:quick:begin -->\n", "\n<!-- report:quick:end -->"
    head, rest = readme.split(begin)
    tail = rest.split(end)[1]
    assert (copy / "README.md").read_text() == head + begin + report[:-1] + end + tail


def test_dry_run_lists_finished_runs_as_done(tmp_path):
    copy = experiments_copy(tmp_path)
    results_dir = tmp_path / "results"
    finished = [suite.Run("yeast", "sd", seed) for seed in suite.SEEDS]
    for run in finished:
        write(results_dir / "quick", run, 0.5)
    files = sorted(results_dir.rglob("*"))
    done = run_entry_point(
        copy,
        "run_experiments",
        "--profile=quick",
        f"--results_dir={results_dir}",
        f"--workdir={tmp_path / 'work'}",
        "--datasets=yeast",
        "--dry_run",
    )
    assert done.returncode == 0, done.stderr
    planned = suite.plan("quick", results_dir / "quick", [], ["yeast"])
    assert done.stdout.splitlines() == [
        f"{len(planned)} runs planned, {len(planned) - len(finished)} to do.",
        *(f"{'done' if r in finished else 'to do':6} {r.name}" for r in planned),
    ]
    assert sorted(results_dir.rglob("*")) == files  # a dry run writes nothing


# --------------------------------------------------------------------------------------------
# Loss edge inputs
# --------------------------------------------------------------------------------------------
