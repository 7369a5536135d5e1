"""The experiment suite's planning, skipping and report, on result files written here."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

# The repository root, where the `experiments` package is, for a bare `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import experiment_report, suite


def fake_record(run, value):
    groups = {"head": [0], "medium": [1], "tail": [2]}
    bootstrap = {g: {"macro_f1": [value] * 11, "mAP": [value] * 11} for g in groups}
    return {
        "run": {
            "dataset": run.dataset,
            "method": run.method,
            "seed": run.seed,
            "temperature": run.temperature,
        },
        "linear_eval": {k: value for k in experiment_report.METRICS},
        "train_label_counts": [100, 10, 1] if run.dataset == "debtags" else [5, 5, 5],
        "label_groups": groups,
        "group_bootstrap": bootstrap,
        "wall_seconds": 2.0,
        "hardware": "cpu, 2 cores",
    }


def write(results_dir, run, value):
    path = suite.result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fake_record(run, value)))


def test_plan_skips_nothing_it_needs_and_adds_the_best_baseline_sweep(tmp_path):
    runs = suite.plan("quick", tmp_path, [])
    assert len(runs) == len(set(runs))
    comparison = [r for r in runs if r.temperature == suite.DEFAULT_TEMPERATURE]
    assert len(comparison) == 4 * (6 + 3) * 3  # 6 compared + 3 ablations, 4 datasets, 3 seeds
    assert {r.method for r in runs if r.temperature != suite.DEFAULT_TEMPERATURE} == {"sd"}
    for run in comparison:  # the baselines on yeast finish: "jaccard" is the best
        if run.dataset == "yeast" and run.method in suite.BASELINES:
            write(tmp_path, run, 0.6 if run.method == "jaccard" else 0.5)
    swept = {r.method for r in suite.plan("quick", tmp_path, []) if r.temperature != 0.1}
    assert swept == {"sd", "jaccard"}
    only_yeast = suite.plan("quick", tmp_path, [], ["yeast"])
    assert only_yeast == [r for r in suite.plan("quick", tmp_path, []) if r.dataset == "yeast"]
    with pytest.raises(ValueError, match=r"datasets: unknown \['imagenet'\]"):
        suite.plan("quick", tmp_path, [], ["imagenet"])


def test_report_means_bold_and_paired_t_test(tmp_path):
    rng = np.random.default_rng(0)
    values = {}
    for run in suite.plan("quick", tmp_path, ["comparison", "ablation"]):
        base = {"sd": 0.70, "all": 0.60}.get(run.method, 0.5)
        values[run] = base + 0.01 * rng.standard_normal()
        write(tmp_path, run, values[run])
    for method in suite.TSNE_METHODS:
        path = tmp_path / "embeddings" / f"{suite.TSNE_DATASET}_{method}.npz"
        path.parent.mkdir(exist_ok=True)
        labels = (rng.random((120, 10)) < 0.3).astype(np.uint8)
        np.savez(path, features=rng.standard_normal((120, 8)), labels=labels)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- report:quick:begin -->\nold\n<!-- report:quick:end -->\n")
    experiment_report.write_report("quick", tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("intro") and "\nold\n" not in text and text.count("report:quick") == 2
    sd = [values[suite.Run("yeast", "sd", s)] for s in suite.SEEDS]
    rival = [values[suite.Run("yeast", "all", s)] for s in suite.SEEDS]
    row = f"| sd | **{np.mean(sd):.4f} ± {np.std(sd, ddof=1):.4f}**"
    assert row in text
    p = stats.ttest_rel(sd, rival).pvalue
    assert f"mAP Δ = {np.mean(sd) - np.mean(rival):+.4f} (p = {p:.3f}, n = 3" in text
    # The temperature table's τ = 0.1 row pairs sd with the best baseline (`all`) too.
    tau_row = next(line for line in text.splitlines() if line.startswith("| 0.1 | "))
    assert tau_row.endswith(f"| {np.mean(sd) - np.mean(rival):+.4f} (p = {p:.2f}) |")
    # The S-D-against-each table: yeast's cell for `any` (the table's second column).
    other = [values[suite.Run("yeast", "any", s)] for s in suite.SEEDS]
    p_any = stats.ttest_rel(sd, other).pvalue
    yeast_row = next(line for line in text.splitlines() if line.startswith("| yeast | "))
    cell = f"{np.mean(sd) - np.mean(other):+.4f}{'*' if p_any < 0.05 else ''} (p = {p_any:.2f})"
    assert yeast_row.split(" | ")[2] == cell
    assert "On **debtags**" in text  # the most imbalanced labels
    for figure in ("temperature.png", "longtail.png", "tsne.png"):
        assert (tmp_path / figure).stat().st_size > 5000
    assert len((tmp_path / "runs.md").read_text().splitlines()) == 2 + 2 + len(values)


def test_anchor_choice_balances_the_relations():
    # Row 0 has every relation at least once; row 1 lacks three of them.
    relations = np.array([[0, 1, 2, 3, 4, 4], [0, 0, 0, 4, 4, 4]])
    assert experiment_report.choose_anchor(None, relations) == 0
    assert experiment_report.choose_anchor(None, relations[::-1]) == 1
