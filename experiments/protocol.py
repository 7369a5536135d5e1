"""The tuning protocol, fixed before any of its runs: what is tuned, on what, how it is chosen.

Question: does S-D beat its baselines? Every entry gets the same tuning budget over its own
knobs, is chosen on a validation split by one rule applied by code, and is then scored once on
test with fresh seeds. Nothing here may change after the first run of a profile; a change is a
new profile.

- **Data.** Every run trains on `train_without_validation` (`config.dataset.validation`; the
  dataset modules say how each validation split is carved from the training data, disjoint
  from test). Tuning runs score the validation split only (`eval_split = "validation"`: test is
  not loaded); confirmation runs score test, with validation beside it.
- **Settings.** `pretrain` (in-batch contrastive pre-training, then a linear probe) and `joint`
  (BCE + contrastive, scored by its own classifier), as in `experiments.suite.SETTINGS`.
  `moco` is opt-in (`--moco`) and exploratory only: at CPU budgets its runs are 400-1,000
  steps where MulSupCon trains 150,000, and in the suite's earlier runs BCE beat every MoCo
  encoder on the mosaics, so a ranking of losses in that setting says little.
- **Entries.** S-D, `sd_swapped`, ALL, ANY, Jaccard, MulSupCon and BCE in each setting, and on
  debtags the TF-IDF + logistic regression reference (`experiments.text_reference`), which is
  the same model in every setting.
- **Equal budgets.** For each (dataset, setting, entry), `Budget.num_configs` configurations,
  the first ones of a seeded permutation of the entry's own search space (`search_space`):
  learning rate, steps and τ for a contrastive loss, plus the joint weight and the
  classifier's learning rate in `joint`; learning rate, steps, weight decay and (where the
  encoder has it) dropout for BCE, plus the classifier's learning rate in `joint`; C and the
  n-gram range for TF-IDF. Values are multiples of the config file's, except τ, dropout and
  the TF-IDF knobs. Each configuration trains with every tuning seed.
- **Selection.** `select`: per (dataset, setting, entry), the configuration with the best
  validation mAP of the setting's own scorer (the probe in `pretrain` and `moco`, the
  classifier in `joint`), averaged over tuning seeds; ties go to the lower configuration id.
  It reads tuning records only and refuses any record that holds test metrics.
- **Confirmation.** The selected configuration of each entry, retrained with every
  confirmation seed (disjoint from the tuning seeds), scored once on test. Each run's record
  keeps the mAP of `Protocol.bootstrap_resamples` resamples of the test examples
  (`sdjax.metrics.bootstrap_mean_average_precision`, computed from float32 scores), and
  its float32 test scores go to `<results>/<profile>/test_scores/` (about 2 MB a debtags run:
  kept where they ran, not committed; the report needs only the records).
- **Ledger.** Every finished run appends one line to `<results>/<profile>/ledger.jsonl`
  (configuration, overrides, seed, validation mAP); the file is only appended to. On debtags
  it also keeps the SHA-256 of the prepared data (apt lists change between machines), and a
  run on other data is refused (`check_data`): its scores could not be compared.
- **Statistics** (`experiments.stats`, `experiments.protocol_report`): the primary family is
  S-D against each other entry, in each primary setting, on `PRIMARY_DATASET`: 14 contrasts,
  Holm-corrected together. Intervals come from a two-stage paired bootstrap (seeds, then test
  examples). A difference is claimed only when its 95% interval excludes 0, its
  Holm-corrected p < `ALPHA` and its size exceeds `MARGIN`; otherwise a TOST at `MARGIN`
  (Holm over the same family) says whether the two are practically equal. Everything else
  (Yeast, MoCo, other metrics) is exploratory and labelled so.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import zlib
from pathlib import Path

import numpy as np

from experiments.suite import CONFIG_FILES, SETTINGS

CONTRASTIVE = ("sd", "sd_swapped", "all", "any", "jaccard", "mulsupcon")
NEURAL_ENTRIES = (*CONTRASTIVE, "bce")
TEXT_REFERENCE = "tfidf"
REFERENCE_SETTING = "reference"  # the TF-IDF reference: no neural setting, one per dataset
TEXT_DATASETS = ("debtags",)
PRIMARY_SETTINGS = ("pretrain", "joint")
EXPLORATORY_SETTINGS = ("moco",)  # opt-in: see the module docstring
PRIMARY_DATASET = "debtags"
SUBJECT = "sd"
MARGIN = 0.005  # mAP: smaller differences are not claimed; TOST tests equivalence within it
ALPHA = 0.05
SCORERS = {  # the results entry that scores a setting's runs
    **{setting: SETTINGS[setting].scored_by for setting in SETTINGS},
    REFERENCE_SETTING: TEXT_REFERENCE,
}


@dataclasses.dataclass(frozen=True)
class Knob:
    """One tuned setting: a config field (or a TF-IDF argument) and its candidate values.

    `relative`: the values multiply the config file's value of `field` (or of `relative_to`,
    after that knob's own value is applied).
    """

    field: str
    values: tuple
    relative: bool = False
    relative_to: str = ""


LEARNING_RATE = Knob("optimizer.learning_rate", (1 / 3, 1.0, 3.0), relative=True)
STEPS = Knob("num_train_steps", (0.5, 1.0, 1.5), relative=True)  # mean 1: the budget holds
TEMPERATURE = Knob("loss.temperature", (0.05, 0.1, 0.2, 0.5))
JOINT_WEIGHT = Knob("loss.joint_weight", (0.1, 0.3, 1.0, 3.0), relative=True)
# The joint classifier's own learning rate, a multiple of the encoder's: it may need to move
# faster than the encoder to converge (issue: joint classifiers trailed probes on their own
# encoders).
CLASSIFIER_RATE = Knob(
    "optimizer.classifier_learning_rate",
    (1.0, 3.0, 10.0),
    relative=True,
    relative_to="optimizer.learning_rate",
)
WEIGHT_DECAY = Knob("optimizer.weight_decay", (0.1, 1.0, 10.0), relative=True)
DROPOUT = Knob("model.encoder.dropout_rate", (0.0, 0.25, 0.5))
TFIDF_C = Knob("inverse_regularization", (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0))
TFIDF_NGRAMS = Knob("max_ngram", (1, 2))


@dataclasses.dataclass(frozen=True)
class Budget:
    num_configs: int  # configurations per (dataset, setting, entry)
    tuning_seeds: tuple[int, ...]  # each configuration trains with each of these


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A profile of the protocol.

    Attributes:
      config_profile: the budget of the config files (experiments/budgets.py): "" = as they
        are, "tiny" = their tiny profile, "quick" = the suite's quick budget.
      budgets: {dataset: Budget}, the datasets it runs.
      confirmation_seeds: the seeds of the confirmation stage, disjoint from tuning seeds.
      bootstrap_resamples: test-example resamples per confirmation run.
      description: one line for the dry run and the report.
    """

    config_profile: str
    budgets: dict
    confirmation_seeds: tuple[int, ...]
    bootstrap_resamples: int
    description: str


PROTOCOLS = {
    # About 12 hours on the 2-core CPU (`--dry_run` prints the estimate).
    "protocol": Protocol(
        config_profile="",
        budgets={
            "debtags": Budget(num_configs=4, tuning_seeds=(1000,)),
            "yeast": Budget(num_configs=6, tuning_seeds=(1000,)),
        },
        confirmation_seeds=tuple(range(10)),
        bootstrap_resamples=1000,
        description="debtags (primary) and Yeast (replication), the config files as they are",
    ),
    # The same protocol on a smaller grid and the suite's quick budget: a rehearsal of
    # the whole pipeline in about 1.3 hours; 2 seeds are too few for its statistics to mean much.
    "protocol_quick": Protocol(
        config_profile="quick",
        budgets={
            "debtags": Budget(num_configs=2, tuning_seeds=(1000,)),
            "yeast": Budget(num_configs=2, tuning_seeds=(1000,)),
        },
        confirmation_seeds=(0, 1),
        bootstrap_resamples=1000,
        description="the same protocol on a smaller grid, quick configs, 2 confirmation seeds",
    ),
    # The plumbing end to end in minutes: the tiny configs (24 steps) on Yeast alone.
    "protocol_smoke": Protocol(
        config_profile="tiny",
        budgets={"yeast": Budget(num_configs=2, tuning_seeds=(1000,))},
        confirmation_seeds=(0, 1),
        bootstrap_resamples=1000,
        description="a smoke test of the protocol's plumbing: tiny configs, Yeast only",
    ),
}

# Mean wall time of one run at the config file's step count, from the committed suite runs on
# the 2-core AMD EPYC (experiments/results/<profile>/runs.md), for the dry run's estimate.
# The TF-IDF reference took 104 s with unigrams on all of debtags' training split.
ESTIMATED_SECONDS = {
    ("", "debtags"): {"pretrain": 165, "joint": 194, "moco": 116, "reference": 150},
    ("", "yeast"): {"pretrain": 21, "joint": 17, "moco": 13},
    ("quick", "debtags"): {"pretrain": 51, "joint": 60, "moco": 40, "reference": 50},
    ("quick", "yeast"): {"pretrain": 13, "joint": 12, "moco": 12},
    # A guess for an idle machine: the first smoke run took 30-80 s a run with the two cores
    # shared by about 14 busy processes.
    ("tiny", "yeast"): {"pretrain": 8, "joint": 8, "moco": 8},
}
# Per test resample (sdjax.metrics.bootstrap_mean_average_precision): debtags' 2,400 test
# examples x 218 tags took 0.11 s with the 2 cores loaded 7x over; Yeast's 917 x 14, 0.004 s.
BOOTSTRAP_SECONDS = {"debtags": 0.02, "yeast": 0.002}


def check_protocols() -> None:
    """Every profile's confirmation seeds are disjoint from its tuning seeds, and its bootstrap
    can reach Holm's first threshold: the smallest two-sided p, 2 / (R + 1), must be below
    ALPHA over the primary family's size."""
    family_size = len(PRIMARY_SETTINGS) * (len(NEURAL_ENTRIES) - 1 + 1)  # + TF-IDF
    for name, protocol in PROTOCOLS.items():
        for dataset, budget in protocol.budgets.items():
            if set(budget.tuning_seeds) & set(protocol.confirmation_seeds):
                raise ValueError(f"{name}: {dataset}'s tuning seeds overlap confirmation seeds.")
        if 2 / (protocol.bootstrap_resamples + 1) >= ALPHA / family_size:
            raise ValueError(f"{name}: too few bootstrap resamples for Holm over {family_size}.")


def entries(dataset: str, setting: str) -> tuple[str, ...]:
    if setting == REFERENCE_SETTING:
        return (TEXT_REFERENCE,) if dataset in TEXT_DATASETS else ()
    return CONTRASTIVE if setting == "moco" else NEURAL_ENTRIES


def settings_of(moco: bool = False) -> tuple[str, ...]:
    return (*PRIMARY_SETTINGS, *(EXPLORATORY_SETTINGS if moco else ()), REFERENCE_SETTING)


def has_dropout(dataset: str) -> bool:
    from sdjax import config_lib

    return "dropout_rate" in config_lib.load_config_file(CONFIG_FILES[dataset]).model.encoder


def search_space(dataset: str, setting: str, entry: str) -> list[Knob]:
    """The knobs an entry is tuned over in a setting (the module docstring says why)."""
    if entry == TEXT_REFERENCE:
        return [TFIDF_C, TFIDF_NGRAMS]
    if entry == "bce":
        knobs = [LEARNING_RATE, STEPS, WEIGHT_DECAY, *([DROPOUT] if has_dropout(dataset) else [])]
    else:
        knobs = [LEARNING_RATE, STEPS, TEMPERATURE]
        if setting == "joint":
            knobs.append(JOINT_WEIGHT)
    if setting == "joint":
        knobs.append(CLASSIFIER_RATE)
    return knobs


def configurations(dataset: str, setting: str, entry: str, count: int) -> list[dict]:
    """The first `count` configurations of a seeded permutation of the entry's search space:
    [{field: knob value}]. The permutation depends on (dataset, setting, entry) only, so a
    smaller budget tries a prefix of a larger one's configurations."""
    knobs = search_space(dataset, setting, entry)
    grid = list(itertools.product(*(knob.values for knob in knobs)))
    if count > len(grid):
        raise ValueError(f"count: got {count}, expected <= the {len(grid)} configurations.")
    key = zlib.crc32(f"{dataset}/{setting}/{entry}".encode())
    order = np.random.default_rng(key).permutation(len(grid))[:count]
    return [{knob.field: value for knob, value in zip(knobs, grid[i], strict=True)} for i in order]


def config_overrides(dataset: str, setting: str, entry: str, knobs: dict, base) -> dict:
    """The config overrides of a neural configuration: its setting's, its loss's, its knobs'
    (relative values resolved against `base`, the dataset's config file)."""
    setting_spec = SETTINGS[setting]
    if entry == "bce":
        overrides = dict(setting_spec.bce_overrides)
    else:
        overrides = {**setting_spec.overrides, "loss.positives": entry}
    by_field = {knob.field: knob for knob in (*KNOBS,)}
    for field, value in knobs.items():
        knob = by_field[field]
        if not knob.relative:
            overrides[field] = value
            continue
        reference = knob.relative_to or field
        base_value = overrides.get(reference, _get(base, reference))
        resolved = value * base_value
        overrides[field] = max(1, round(resolved)) if field == "num_train_steps" else resolved
    return overrides


KNOBS = (
    LEARNING_RATE,
    STEPS,
    TEMPERATURE,
    JOINT_WEIGHT,
    CLASSIFIER_RATE,
    WEIGHT_DECAY,
    DROPOUT,
    TFIDF_C,
    TFIDF_NGRAMS,
)


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


# --------------------------------------------------------------------------------------------
# Runs, the plan and the ledger
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProtocolRun:
    dataset: str
    setting: str  # a key of SETTINGS, or REFERENCE_SETTING for the TF-IDF reference
    entry: str
    config_id: int  # its position in `configurations(...)`
    seed: int
    stage: str  # "tuning" or "confirmation"

    @property
    def name(self) -> str:
        return (
            f"{self.stage}/{self.dataset}/{self.setting}/{self.entry}/"
            f"c{self.config_id}_s{self.seed}"
        )

    @property
    def scorer(self) -> str:
        return SCORERS[self.setting]


def tuning_runs(profile: str, dataset: str, setting: str, entry: str) -> list[ProtocolRun]:
    budget = PROTOCOLS[profile].budgets[dataset]
    # The TF-IDF reference is deterministic: one run per configuration.
    seeds = budget.tuning_seeds[:1] if entry == TEXT_REFERENCE else budget.tuning_seeds
    return [
        ProtocolRun(dataset, setting, entry, config_id, seed, "tuning")
        for config_id in range(budget.num_configs)
        for seed in seeds
    ]


def confirmation_runs(profile: str, dataset: str, setting: str, entry: str, config_id: int):
    seeds = PROTOCOLS[profile].confirmation_seeds
    if entry == TEXT_REFERENCE:
        seeds = seeds[:1]  # the same scores for every seed
    return [ProtocolRun(dataset, setting, entry, config_id, seed, "confirmation") for seed in seeds]


def cells(profile: str, datasets=(), moco: bool = False) -> list[tuple[str, str, str]]:
    """Every (dataset, setting, entry) of the profile, in order."""
    chosen = [d for d in PROTOCOLS[profile].budgets if not datasets or d in datasets]
    return [
        (dataset, setting, entry)
        for dataset in chosen
        for setting in settings_of(moco)
        for entry in entries(dataset, setting)
    ]


def result_path(results_dir: Path, run: ProtocolRun) -> Path:
    return results_dir / "runs" / f"{run.name}.json"


def load_result(results_dir: Path, run: ProtocolRun) -> dict | None:
    path = result_path(results_dir, run)
    return json.loads(path.read_text()) if path.exists() else None


def plan(
    profile: str, results_dir: Path, datasets=(), moco: bool = False
) -> tuple[list[ProtocolRun], list[tuple[str, str, str]]]:
    """(every run that can be planned now, the cells whose confirmation waits for tuning).

    Tuning runs are all known in advance; a cell's confirmation runs are planned once all of
    its tuning runs have finished and `select` has chosen its configuration.
    """
    unknown = set(datasets) - set(PROTOCOLS[profile].budgets)
    if unknown:
        raise ValueError(
            f"datasets: got {sorted(unknown)}, expected some of {list(PROTOCOLS[profile].budgets)}"
        )
    runs, waiting = [], []
    for cell in cells(profile, datasets, moco):
        tuning = tuning_runs(profile, *cell)
        runs += tuning
        records = [load_result(results_dir, run) for run in tuning]
        if any(record is None for record in records):
            waiting.append(cell)
            continue
        runs += confirmation_runs(profile, *cell, select(records)[cell])
    return runs, waiting


def select(records: list[dict]) -> dict[tuple[str, str, str], int]:
    """{(dataset, setting, entry): chosen configuration id}: the best mean validation mAP of
    the setting's scorer over tuning seeds; ties go to the lower id.

    Raises:
      ValueError: a record is not a tuning record, or holds test metrics: selection never
        sees test.
    """
    means: dict[tuple, dict[int, list[float]]] = {}
    for record in records:
        if record["run"]["stage"] != "tuning" or "test" in record:
            raise ValueError(
                f"records: got {record['run']['stage']} run {record['name']} with test "
                "metrics; selection reads tuning records (validation only)."
            )
        run = record["run"]
        cell = (run["dataset"], run["setting"], run["entry"])
        means.setdefault(cell, {}).setdefault(run["config_id"], []).append(record["validation_mAP"])
    return {
        cell: max(sorted(by_config), key=lambda c: np.mean(by_config[c]))
        for cell, by_config in means.items()
    }


LEDGER = "ledger.jsonl"  # every finished run, one line each; only ever appended to
RERUNS = "reruns.jsonl"  # finished runs run again (`--rerun`): then and now, outside the results


def append_to_ledger(results_dir: Path, record: dict) -> None:
    """One line per finished run; the file is only ever appended to."""
    row = {
        "run": record["name"],
        **record["run"],
        "knobs": record["knobs"],
        "overrides": record["overrides"],
        "scored_by": record["scored_by"],
        "validation_mAP": record["validation_mAP"],
        "hardware": record["hardware"],
        **{key: record[key] for key in ("data_sha256", "code_revision") if key in record},
    }
    append_line(results_dir / LEDGER, row)


def append_line(path: Path, row: dict) -> None:
    """Appends `row`, stamped with the time it finished, as one JSON line."""
    row = {**row, "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lines:
        lines.write(json.dumps(row) + "\n")


def read_lines(path: Path) -> list[dict]:
    """The JSON lines of `path`; none if it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_data(ledger: list[dict], dataset: str, data_sha256: str | None) -> None:
    """Refuses to add runs of `dataset` on data other than the ledger's runs of it trained on:
    their scores could not be compared. Rows without a digest (before it was kept) pass."""
    for row in ledger:
        recorded = row.get("data_sha256")
        if row["dataset"] == dataset and data_sha256 and recorded and recorded != data_sha256:
            raise ValueError(
                f"{dataset}: the data prepared here has SHA-256 {data_sha256[:16]}..., expected "
                f"{recorded[:16]}..., the data that {row['run']} in the ledger trained on. "
                "Prepare it from the same sources (debtags: the same apt lists) or start a new "
                "profile."
            )


def read_ledger(results_dir: Path) -> list[dict]:
    return read_lines(results_dir / LEDGER)


def estimated_seconds(profile: str, run: ProtocolRun | None, cell=None) -> float:
    """The dry run's estimate of one run's wall time: ESTIMATED_SECONDS scaled by the steps
    knob, plus a confirmation run's test bootstrap. `run` None: a confirmation run of `cell`
    before its configuration is selected (the steps knob's values average 1)."""
    protocol = PROTOCOLS[profile]
    dataset, setting, entry = cell or (run.dataset, run.setting, run.entry)
    seconds = ESTIMATED_SECONDS[protocol.config_profile, dataset][setting]
    if run is not None:
        budget = protocol.budgets[dataset]
        knobs = configurations(dataset, setting, entry, budget.num_configs)[run.config_id]
        seconds *= knobs.get(STEPS.field, 1.0)
    if run is None or run.stage == "confirmation":
        seconds += protocol.bootstrap_resamples * BOOTSTRAP_SECONDS[dataset]
    return seconds


check_protocols()
