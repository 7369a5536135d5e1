"""What the experiment suite runs: datasets, methods, seeds, profiles, and where results live.

Shared by `experiments.run_experiments` (which runs it) and `experiments.experiment_report`
(which reports it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

DATASETS = ("mnist_mosaic", "fashion_mosaic", "yeast", "debtags")
CONFIG_FILES = {  # configs/<file>.py for each dataset
    "mnist_mosaic": "default",
    "fashion_mosaic": "fashion_mosaic",
    "yeast": "yeast",
    "debtags": "debtags",
}
BASELINES = ("all", "any", "jaccard", "mulsupcon")
COMPARED = ("sd", *BASELINES, "bce")
ABLATIONS = ("sd_similarity_only", "sd_dissimilarity_only", "sd_swapped")
TEMPERATURES = (0.05, 0.07, 0.1, 0.2, 0.5)
DEFAULT_TEMPERATURE = 0.1
SEEDS = (0, 1, 2)
TSNE_DATASET = "mnist_mosaic"
TSNE_METHODS = ("sd", "any")
TSNE_POINTS = 1500

# Each profile is a profile of the config files (configs/<file>.py:quick holds the quick
# profile's steps and examples: the same models and protocol on a smaller budget).
PROFILES = {
    "quick": {"config_profile": "quick", "temperature_datasets": ("yeast",)},
    "full": {"config_profile": "", "temperature_datasets": ("yeast", "mnist_mosaic")},
}
COMMON_OVERRIDES = {
    "linear_eval.random_init_baseline": False,
    "linear_eval.save_test_outputs": True,
    "checkpoint_every_steps": 100,
    "log_every_steps": 50,
}


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    method: str  # a `positives` value, or "bce"
    seed: int
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def name(self) -> str:
        if self.method == "bce":
            return f"{self.dataset}/bce_s{self.seed}"
        return f"{self.dataset}/{self.method}_t{self.temperature:g}_s{self.seed}"


def result_path(results_dir: Path, run: Run) -> Path:
    return results_dir / "runs" / f"{run.name}.json"


def load_result(results_dir: Path, run: Run) -> dict | None:
    path = result_path(results_dir, run)
    return json.loads(path.read_text()) if path.exists() else None


def best_baseline(results_dir: Path, dataset: str) -> str | None:
    """The contrastive baseline with the highest mean mAP on `dataset`, once all seeds ran."""
    means = {}
    for method in BASELINES:
        results = [load_result(results_dir, Run(dataset, method, seed)) for seed in SEEDS]
        if any(r is None for r in results):
            return None
        means[method] = np.mean([r["linear_eval"]["mAP"] for r in results])
    return max(means, key=means.get)


def plan(
    profile: str, results_dir: Path, sections: list[str], datasets: list[str] = ()
) -> list[Run]:
    """Every run of the chosen sections and datasets, in order.

    The temperature sweep needs the comparison: its baseline is the best one there.
    """
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        raise ValueError(f"datasets: unknown {sorted(unknown)}; expected some of {DATASETS}")
    wanted = set(sections or ("comparison", "ablation", "temperature", "longtail", "tsne"))
    runs = []
    if wanted & {"comparison", "longtail", "tsne"}:
        runs += [Run(d, m, s) for d in DATASETS for m in COMPARED for s in SEEDS]
    if "ablation" in wanted:
        runs += [Run(d, m, s) for d in DATASETS for m in ABLATIONS for s in SEEDS]
    if "temperature" in wanted:
        for dataset in PROFILES[profile]["temperature_datasets"]:
            baseline = best_baseline(results_dir, dataset)
            for method in ("sd", baseline) if baseline else ("sd",):
                runs += [
                    Run(dataset, method, s, t)
                    for t in TEMPERATURES
                    if t != DEFAULT_TEMPERATURE
                    for s in SEEDS
                ]
    if datasets:
        runs = [run for run in runs if run.dataset in datasets]
    return list(dict.fromkeys(runs))


def missing_runs(profile: str, results_dir: Path) -> list[Run]:
    """The runs of the whole profile (every section and dataset) that have no result file.

    A report is only built from a complete profile: a table from some seeds or datasets reads
    like a finished result.
    """
    return [r for r in plan(profile, results_dir, []) if not result_path(results_dir, r).exists()]
