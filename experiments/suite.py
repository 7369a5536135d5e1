"""What the experiment suite runs: datasets, methods, seeds, profiles, and where results live.

Shared by `experiments.run_experiments` (which runs it) and `experiments.experiment_report`
(which reports it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
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
COMPARED = ("sd", "sd_swapped", *BASELINES, "bce")
ABLATIONS = ("sd_similarity_only", "sd_dissimilarity_only")
TEMPERATURES = (0.05, 0.07, 0.1, 0.2, 0.5)
DEFAULT_TEMPERATURE = 0.1
SEEDS = (0, 1, 2, 3, 4)  # every seed any profile runs; a profile runs its first `num_seeds`
TSNE_DATASET = "mnist_mosaic"
TSNE_METHODS = ("sd", "any")
TSNE_POINTS = 1500


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to train with a contrastive loss, and how its runs are scored.

    Attributes:
      description: one line for tables.
      overrides: config overrides of its contrastive runs.
      bce_overrides: those of its BCE-only baseline.
      scored_by: the results entry that scores a run: "linear_eval" (a linear probe on the
        frozen encoder) or "classifier" (the jointly trained classifier itself).
    """

    description: str
    overrides: dict
    bce_overrides: dict
    scored_by: str


SETTINGS = {
    "pretrain": Setting(
        "in-batch contrastive pre-training, then a linear probe",
        {},
        {"method": "bce"},
        "linear_eval",
    ),
    # MoCo changes nothing for BCE: its baseline is the pre-training setting's BCE run.
    "moco": Setting(
        "MulSupCon's query/key setting (momentum encoder, label queue), then a linear probe",
        # The key encoder follows at 1 - 0.99 a step: a time constant of 100 steps, well inside
        # the suite's runs (MulSupCon's 0.999 suits its 150,000 steps).
        {"framework": "moco", "moco.momentum": 0.99},
        {"method": "bce"},
        "linear_eval",
    ),
    "joint": Setting(
        "joint BCE + contrastive fine-tuning, scored by its own classifier",
        {"method": "joint"},
        {"method": "joint", "loss.joint_weight": 0.0},
        "classifier",
    ),
}

# Each profile trains the config files on a budget, its `config_profile` (experiments/budgets.py:
# "quick" is the same models and protocol on fewer steps and examples).
PROFILES = {
    "quick": {
        "config_profile": "quick",
        "num_seeds": 3,
        "temperature_datasets": ("yeast",),
        # The other settings on every dataset would not fit the quick profile's hour.
        "setting_datasets": {"pretrain": DATASETS, "moco": ("yeast",), "joint": ("yeast",)},
    },
    "full": {
        "config_profile": "",
        "num_seeds": 5,
        "temperature_datasets": ("yeast", "mnist_mosaic"),
        "setting_datasets": {setting: DATASETS for setting in SETTINGS},
    },
}
# `full` on the accelerator budget: larger encoders, batches and step counts, in bfloat16.
PROFILES["gpu"] = {**PROFILES["full"], "config_profile": "gpu"}
COMMON_OVERRIDES = {
    "evals.random_init_probe": False,
    "evals.save_test_outputs": True,
    "checkpoint_every_steps": 100,
    "log_every_steps": 50,
}


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    method: str  # a `positives` value, or "bce"
    seed: int
    temperature: float = DEFAULT_TEMPERATURE
    setting: str = "pretrain"

    @property
    def name(self) -> str:
        # The pre-training setting's runs keep the names they had before settings existed.
        prefix = self.dataset if self.setting == "pretrain" else f"{self.dataset}/{self.setting}"
        if self.method == "bce":
            return f"{prefix}/bce_s{self.seed}"
        return f"{prefix}/{self.method}_t{self.temperature:g}_s{self.seed}"

    def config_overrides(self) -> dict:
        """The overrides that make this run out of its dataset's config file."""
        setting = SETTINGS[self.setting]
        if self.method == "bce":
            return dict(setting.bce_overrides)
        return {
            **setting.overrides,
            "loss.positives": self.method,
            "loss.temperature": self.temperature,
        }

    def score(self, record: dict, scored_by: str | None = None) -> dict:
        """The test metrics that score this run in its result file: its setting's `scored_by`
        entry, or the one named."""
        return record[scored_by or SETTINGS[self.setting].scored_by]


def entry_run(dataset: str, setting: str, method: str, seed: int, temperature=None) -> Run:
    """The run that holds (dataset, setting, method, seed)'s result; settings share BCE runs
    whose training they do not change."""
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if method == "bce" and SETTINGS[setting].bce_overrides == SETTINGS["pretrain"].bce_overrides:
        setting = "pretrain"
    return Run(dataset, method, seed, temperature, setting)


def profile_seeds(profile: str) -> tuple[int, ...]:
    return SEEDS[: PROFILES[profile]["num_seeds"]]


def result_path(results_dir: Path, run: Run) -> Path:
    return results_dir / "runs" / f"{run.name}.json"


def load_result(results_dir: Path, run: Run) -> dict | None:
    path = result_path(results_dir, run)
    return json.loads(path.read_text()) if path.exists() else None


def best_baseline(profile: str, results_dir: Path, dataset: str) -> str | None:
    """The contrastive baseline with the highest mean mAP on `dataset` (pre-training setting),
    once all of the profile's seeds ran."""
    means = {}
    for method in BASELINES:
        runs = [Run(dataset, method, seed) for seed in profile_seeds(profile)]
        results = [load_result(results_dir, run) for run in runs]
        if any(r is None for r in results):
            return None
        means[method] = np.mean([run.score(r)["mAP"] for run, r in zip(runs, results, strict=True)])
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
    seeds = profile_seeds(profile)
    runs = []
    if wanted & {"comparison", "longtail", "tsne"}:
        for setting, setting_datasets in PROFILES[profile]["setting_datasets"].items():
            runs += [
                entry_run(d, setting, m, s)
                for d in setting_datasets
                for m in COMPARED
                for s in seeds
            ]
    if "ablation" in wanted:
        runs += [Run(d, m, s) for d in DATASETS for m in ABLATIONS for s in seeds]
    if "temperature" in wanted:
        for dataset in PROFILES[profile]["temperature_datasets"]:
            baseline = best_baseline(profile, results_dir, dataset)
            for method in ("sd", baseline) if baseline else ("sd",):
                runs += [
                    Run(dataset, method, s, t)
                    for t in TEMPERATURES
                    if t != DEFAULT_TEMPERATURE
                    for s in seeds
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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware_name() -> str:
    """The accelerator, or the CPU model: results can differ in the last digits between CPUs."""
    import jax

    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.device_kind}, {os.cpu_count()} host cores"
    return f"cpu ({cpu_model()}), {os.cpu_count()} cores, {platform.machine()}"


# What decides a run's numbers besides its config: the library, the configs, the experiment code
# and the pinned packages (not the results, which runs write while others train, nor prose).
CODE_PATHS = (
    "sdjax",
    "configs",
    "experiments",
    ":!experiments/results",
    ":!*.md",
    "requirements.txt",
)
CHECKOUT = Path(__file__).resolve().parent.parent


def code_revision(root: Path = CHECKOUT) -> str:
    """The git commit the code at `root` (this checkout) was at, "+modified" if CODE_PATHS
    differ from it; "unknown" outside a git checkout. Runs that span days and machines keep it,
    so each number traces back to the code that made it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--", *CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+modified" if changes else "")
