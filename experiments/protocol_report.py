"""The report of a protocol profile (experiments/protocol.py), from its result files alone.

COMMAND:
  python -m experiments.experiment_report --profiles=protocol   # this report, and the README's

Selection is `protocol.select` over tuning records, which hold validation metrics only (their
runs never load test); test metrics are read from confirmation records only, after selection.
The primary family, its Holm correction, the two-stage bootstrap, the margin and TOST are the
ones experiments/protocol.py fixes; everything outside the primary family is labelled
exploratory.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from experiments import protocol, stats
from experiments.protocol import (
    ALPHA,
    MARGIN,
    PRIMARY_DATASET,
    PRIMARY_SETTINGS,
    PROTOCOLS,
    REFERENCE_SETTING,
    SUBJECT,
    TEXT_REFERENCE,
)

METRICS = ("mAP", "micro_f1", "macro_f1", "micro_auc", "macro_auc")
VERDICTS = {
    "better": "**S-D better**",
    "worse": "**S-D worse**",
    "practically equal": "practically equal",
    "inconclusive": "inconclusive",
}


def uses_moco(results_dir: Path) -> bool:
    """Whether the profile's results include the opt-in MoCo setting."""
    return any((results_dir / "runs").glob("*/*/moco"))


def missing_runs(profile: str, results_dir: Path, moco: bool) -> list[str]:
    """Names of the planned runs without a result file, and of entries still in tuning."""
    runs, waiting = protocol.plan(profile, results_dir, (), moco)
    names = [r.name for r in runs if not protocol.result_path(results_dir, r).exists()]
    return names + [f"confirmation/{'/'.join(cell)}/<not yet selected>" for cell in waiting]


def collect(profile: str, results_dir: Path, moco: bool):
    """({cell: tuning records}, {cell: selected id}, {cell: {seed: confirmation record}})."""
    tuning, selected, confirmation = {}, {}, {}
    for cell in protocol.cells(profile, (), moco):
        tuning[cell] = [
            protocol.load_result(results_dir, run) for run in protocol.tuning_runs(profile, *cell)
        ]
        selected[cell] = protocol.select(tuning[cell])[cell]
        confirmation[cell] = {
            run.seed: protocol.load_result(results_dir, run)
            for run in protocol.confirmation_runs(profile, *cell, selected[cell])
        }
    return tuning, selected, confirmation


def bootstrap_rows(records: dict[int, dict], seeds) -> np.ndarray:
    """[S, 1 + R]: each seed's test mAP replicates; the deterministic reference's one run
    stands for every seed."""
    if len(records) == 1:
        (record,) = records.values()
        return np.array([record["test_bootstrap_mAP"]] * len(seeds))
    return np.array([records[seed]["test_bootstrap_mAP"] for seed in seeds])


def contrast(subject: dict, rival: dict, seeds) -> dict:
    """S-D minus a rival: the seed-mean difference of full-test mAP (bootstrap column 0), its
    95% two-stage bootstrap interval, the two-sided bootstrap p and the TOST p at MARGIN."""
    a, b = bootstrap_rows(subject, seeds), bootstrap_rows(rival, seeds)
    replicates = stats.two_stage_bootstrap(a, b)
    low, high = stats.percentile_interval(replicates)
    return {
        "subject": float(a[:, 0].mean()),
        "rival": float(b[:, 0].mean()),
        "diff": float((a[:, 0] - b[:, 0]).mean()),
        "low": low,
        "high": high,
        "p": stats.bootstrap_p_value(replicates),
        "tost_p": stats.tost_p_value(replicates, MARGIN),
    }


def family(confirmation, dataset: str, settings, seeds) -> dict:
    """{(setting, rival): contrast} of S-D against every other entry, Holm over all of them."""
    effects = {}
    for setting in settings:
        rivals = [(setting, e) for e in protocol.entries(dataset, setting) if e != SUBJECT] + [
            (REFERENCE_SETTING, e) for e in protocol.entries(dataset, REFERENCE_SETTING)
        ]
        for rival_setting, rival in rivals:
            effects[setting, rival] = contrast(
                confirmation[dataset, setting, SUBJECT],
                confirmation[dataset, rival_setting, rival],
                seeds,
            )
    keys = list(effects)
    for name in ("p", "tost_p"):
        adjusted = stats.holm_adjusted([effects[k][name] for k in keys])
        for key, value in zip(keys, adjusted, strict=True):
            effects[key][f"{name}_holm"] = value
    for effect in effects.values():
        effect["verdict"] = stats.verdict(effect, MARGIN, ALPHA)
    return effects


def few_seeds_caveat(seeds) -> list[str]:
    """Resampling a handful of seeds cannot show how much seeds vary: intervals come out
    too narrow, and p-values too small."""
    if len(seeds) >= 10:
        return []
    return [
        f"**Caveat: {len(seeds)} confirmation seeds.** Resampled with replacement, so few seeds "
        "understate how much runs vary from seed to seed: these intervals are too narrow and "
        "these p-values too small to carry a claim.",
        "",
    ]


def family_table(effects: dict) -> list[str]:
    lines = [
        "| setting | S-D vs | S-D mAP | its mAP | Δ mAP | 95% interval | p (Holm) | "
        "TOST p (Holm) | reading |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (setting, rival), e in effects.items():
        lines.append(
            f"| {setting} | {rival} | {e['subject']:.4f} | {e['rival']:.4f} | "
            f"{e['diff']:+.4f} | [{e['low']:+.4f}, {e['high']:+.4f}] | {e['p_holm']:.3f} | "
            f"{e['tost_p_holm']:.3f} | {VERDICTS[e['verdict']]} |"
        )
    return [*lines, "", *family_summary(effects)]


def family_summary(effects: dict) -> list[str]:
    """Each setting's contrasts grouped by their reading, one line per setting, so a sentence
    about the table can be checked against it at a glance."""
    lines = []
    for setting in dict.fromkeys(setting for setting, _ in effects):
        groups = collections.defaultdict(list)
        for (row_setting, rival), effect in effects.items():
            if row_setting == setting:
                groups[effect["verdict"]].append(f"`{rival}`")
        phrases = [
            f"{phrase} {', '.join(groups[verdict])}"
            for verdict, phrase in (
                ("better", "better than"),
                ("worse", "worse than"),
                ("practically equal", "practically equal to"),
                ("inconclusive", "inconclusive against"),
            )
            if groups[verdict]
        ]
        lines.append(f"- `{setting}`: S-D {'; '.join(phrases)}.")
    return [*lines, ""]


def knob_text(knobs: dict) -> str:
    short = {field.rsplit(".", 1)[-1]: value for field, value in knobs.items()}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items())


def code_sentence(records: list[dict]) -> str:
    """Which commits of the code the runs ran at, so every number traces back to its code."""
    counts = collections.Counter(r.get("code_revision", "") for r in records)
    unrecorded = counts.pop("", 0)
    parts = [
        f"`{revision[:12]}{'+modified' if revision.endswith('+modified') else ''}` ({count})"
        for revision, count in sorted(counts.items())
    ]
    if unrecorded:
        parts.append(f"not recorded ({unrecorded}: runs before the commit was kept)")
    return f"Code (git commit: runs): {'; '.join(parts)}."


def reruns_section(reruns: list[dict]) -> list[str]:
    """How far finished runs moved when run again (`--rerun`), on the same CPU model and on
    another."""
    if not reruns:
        return []
    lines = [
        f"**Runs run again** ({protocol.RERUNS}, outside the results): {len(reruns)} finished "
        "runs were trained and scored again.",
        "",
        "| run | then on | now on | validation mAP then → now | test mAP then → now |",
        "|---|---|---|---|---|",
    ]
    for rerun in reruns:
        maps = [
            f"{rerun[key][0]:.4f} → {rerun[key][1]:.4f}"
            + (" (bit for bit)" if rerun[key][0] == rerun[key][1] else "")
            if key in rerun
            else ""
            for key in ("validation_mAP", "test_mAP")
        ]
        lines.append(f"| `{rerun['run']}` | {' | '.join(rerun['hardware'])} | {' | '.join(maps)} |")
    return [*lines, ""]


def tuning_section(profile, tuning, selected) -> list[str]:
    lines = [
        "### Tuning on the validation split",
        "",
        "Each entry's configurations (knob values: multiples of the config file's value,",
        "except τ, dropout, C and n-grams), scored on validation by its setting's scorer; the",
        "selected one has the best mean validation mAP over tuning seeds (`protocol.select`).",
        "",
        "| dataset | setting | entry | configs × seeds | selected | its validation mAP | "
        "range over configs |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell, records in tuning.items():
        by_config = {}
        for record in records:
            by_config.setdefault(record["run"]["config_id"], []).append(record["validation_mAP"])
        means = {c: float(np.mean(v)) for c, v in by_config.items()}
        chosen = selected[cell]
        knobs = next(r["knobs"] for r in records if r["run"]["config_id"] == chosen)
        seeds = len(records) // len(by_config)
        lines.append(
            f"| {' | '.join(cell)} | {len(by_config)} × {seeds} | c{chosen}: {knob_text(knobs)} "
            f"| {means[chosen]:.4f} | {min(means.values()):.4f}–{max(means.values()):.4f} |"
        )
    return [*lines, ""]


def ledger_section(profile, results_dir, moco) -> list[str]:
    """Checks the ledger against the result files: every finished run has its line, with the
    same validation mAP; lines outside the plan or repeated are counted, never dropped."""
    rows = protocol.read_ledger(results_dir)
    runs, _ = protocol.plan(profile, results_dir, (), moco)
    planned = {run.name: run for run in runs}
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    unrecorded = [
        name
        for name, run in planned.items()
        if name not in by_run
        or by_run[name][-1]["validation_mAP"]
        != protocol.load_result(results_dir, run)["validation_mAP"]
    ]
    outside = sorted(name for name in by_run if name not in planned)
    repeated = sorted(name for name, found in by_run.items() if len(found) > 1)
    lines = [
        "### Ledger",
        "",
        f"[ledger.jsonl](results/{profile}/ledger.jsonl) has {len(rows)} lines, one per finished "
        f"run ever (appended, never edited). Planned runs without a matching line: "
        f"{len(unrecorded)}. Runs outside the plan: {len(outside)}"
        + (f" ({', '.join(outside[:10])})" if outside else "")
        + f". Runs recorded more than once: {len(repeated)}"
        + (f" ({', '.join(repeated[:10])})" if repeated else "")
        + ".",
        "",
    ]
    return lines


def joint_head_section(confirmation, datasets) -> list[str]:
    """The joint classifier against a probe on its own frozen encoder, on validation."""
    lines = [
        "### Joint classifiers against probes on their own encoders (validation)",
        "",
        "Mean validation mAP over confirmation seeds of each `joint` entry's classifier and",
        "of a linear probe fitted on the same frozen encoder, on standardised features. Where",
        "a classifier is below its probe, its `joint` row understates the encoder. On debtags",
        "[results/joint_head.md](results/joint_head.md) traces the gap to the probe's",
        "standardisation: the classifier fits the training split about as well as the probe, a",
        "probe on unstandardised features scores what the classifier scores, and a 10× learning",
        "rate, no weight decay or features without dropout do not close it.",
        "",
        "| dataset | entry | classifier | probe | classifier − probe |",
        "|---|---|---|---|---|",
    ]
    below = []
    for dataset in datasets:
        for entry in protocol.entries(dataset, "joint"):
            records = confirmation[dataset, "joint", entry].values()
            classifier = np.mean([r["validation"]["classifier"]["mAP"] for r in records])
            probe = np.mean([r["validation"]["linear_eval"]["mAP"] for r in records])
            lines.append(
                f"| {dataset} | {entry} | {classifier:.4f} | {probe:.4f} | "
                f"{classifier - probe:+.4f} |"
            )
            if classifier < probe:
                below.append(f"{dataset} {entry}")
    summary = (
        f"Below its probe: {', '.join(below)}."
        if below
        else "Every joint classifier matches or beats the probe on its own encoder."
    )
    return [*lines, "", summary, ""]


def metrics_table(confirmation, dataset, setting) -> list[str]:
    names = protocol.entries(dataset, setting)
    if setting != REFERENCE_SETTING:
        names = [*names, *protocol.entries(dataset, REFERENCE_SETTING)]
    lines = [
        "| entry | " + " | ".join(METRICS) + " | seeds |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for entry in names:
        cell_setting = REFERENCE_SETTING if entry == TEXT_REFERENCE else setting
        records = list(confirmation[dataset, cell_setting, entry].values())
        scorer = records[0]["scored_by"]
        cells = []
        for metric in METRICS:
            values = np.array([r["test"][scorer][metric] for r in records])
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.4f} ± {spread:.4f}")
        lines.append(f"| {entry} | " + " | ".join(cells) + f" | {len(records)} |")
    return [*lines, ""]


def write_report(profile: str, results_dir: Path, readme: Path | None = None) -> list[str]:
    """Builds report.md of a complete protocol profile; returns its lines (the README block)."""
    from experiments import experiment_report

    moco = uses_moco(results_dir)
    missing = missing_runs(profile, results_dir, moco)
    if missing:
        raise ValueError(
            f"{profile} in {results_dir} is incomplete: {len(missing)} runs missing "
            f"(e.g. {missing[0]}); a report is only built from a complete profile."
        )
    spec = PROTOCOLS[profile]
    tuning, selected, confirmation = collect(profile, results_dir, moco)
    datasets = list(spec.budgets)
    seeds = spec.confirmation_seeds
    records = [r for rs in tuning.values() for r in rs]
    records += [r for by_seed in confirmation.values() for r in by_seed.values()]
    hours = sum(r["wall_seconds"] for r in records) / 3600
    hardware = sorted({r["hardware"] for r in records})
    body = [
        f"## Results: the `{profile}` protocol profile",
        "",
        f"{spec.description}. {len(records)} runs, {hours:.2f} h of run time, on "
        f"{'; '.join(hardware)}. The protocol, fixed before these runs: "
        "[protocol.py](protocol.py).",
        "",
        code_sentence(records),
        "",
        *(
            [
                f"**Caveat: the runs ran on {len(hardware)} kinds of hardware**, so paired runs "
                "can differ for that reason alone: on another CPU model float rounding differs, "
                "and training amplifies it.",
                "",
            ]
            if len(hardware) > 1
            else []
        ),
        *reruns_section(protocol.read_lines(results_dir / protocol.RERUNS)),
        *tuning_section(profile, tuning, selected),
        *ledger_section(profile, results_dir, moco),
        *joint_head_section(confirmation, datasets),
    ]
    if PRIMARY_DATASET in datasets:
        effects = family(confirmation, PRIMARY_DATASET, PRIMARY_SETTINGS, seeds)
        body += [
            f"### Primary comparison (pre-registered): S-D against each entry on {PRIMARY_DATASET}",
            "",
            f"Test mAP of the selected configurations, mean over {len(seeds)} confirmation seeds",
            "(the TF-IDF reference is deterministic: one run). Δ is S-D's minus the entry's; its",
            "95% interval is a two-stage paired bootstrap (seeds with replacement, then test",
            f"examples, {spec.bootstrap_resamples} replicates). Holm's correction runs over this",
            f"family of {len(effects)} contrasts, for the difference and for the TOST alike. A",
            "difference is claimed only when its interval excludes 0, its Holm p < "
            f"{ALPHA} and |Δ| > {MARGIN}; otherwise",
            f"TOST at ±{MARGIN} says whether the two are practically equal.",
            "",
            *family_table(effects),
            *few_seeds_caveat(seeds),
        ]
    body += ["### Exploratory analyses", "", "Not pre-registered; read as descriptions.", ""]
    for dataset in datasets:
        settings = [s for s in protocol.settings_of(moco) if s != REFERENCE_SETTING]
        if dataset != PRIMARY_DATASET:
            effects = family(confirmation, dataset, PRIMARY_SETTINGS, seeds)
            body += [
                f"**{dataset}: S-D against each entry** (exploratory; Holm over these "
                f"{len(effects)}):",
                "",
                *family_table(effects),
                *few_seeds_caveat(seeds),
            ]
        if moco:
            effects = family(confirmation, dataset, ("moco",), seeds)
            body += [
                f"**{dataset}, MoCo setting** (exploratory; Holm over these {len(effects)}):",
                "",
                *family_table(effects),
            ]
        for setting in settings:
            body += [
                f"**{dataset}, `{setting}`: test metrics** (mean ± std over seeds):",
                "",
                *metrics_table(confirmation, dataset, setting),
            ]
    # report.md lies in results/{profile}/: its links drop that prefix, or go up to results/.
    report = "\n".join(body).replace(f"(results/{profile}/", "(").replace("(results/", "(../")
    (results_dir / "report.md").write_text(
        report.replace("(protocol.py)", "(../../protocol.py)") + "\n"
    )
    if readme is not None:
        experiment_report.write_readme_block(readme, profile, body)
    return body
