"""Tables, significance tests and figures from the suite's result files, into the README.

COMMAND:
  python -m experiments.experiment_report         # every complete profile, README included
  python -m experiments.experiment_report --profiles=full --results_dir=/tmp/suite

The report of a profile is built only from a complete profile (every run has its result file).
It goes into the results directory it was built from (report.md, runs.md, figures); the
profile's block in experiments/README.md is rewritten only from the committed results
(experiments/results/<profile>), whose paths the README links to.

Significance: S-D against another entry is a paired t-test over seeds (runs with the same seed
share the data order), scipy.stats.ttest_rel, whose 95% interval of the mean difference is the
effect size shown. The p-values of one table's comparisons are Holm-corrected together
(statsmodels). Long-tail intervals are percentile bootstrap intervals over test examples, with
the replicates averaged over seeds; a difference is called significant when its
paired-bootstrap 95% interval excludes 0.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
from absl import app, flags
from scipy import stats

from experiments.stats import holm_adjusted
from experiments.suite import (
    ABLATIONS,
    COMPARED,
    DATASETS,
    DEFAULT_TEMPERATURE,
    PROFILES,
    SEEDS,
    SETTINGS,
    TEMPERATURES,
    TSNE_DATASET,
    TSNE_METHODS,
    Run,
    best_baseline,
    entry_run,
    load_result,
    missing_runs,
    plan,
)

EXPERIMENTS = Path(__file__).resolve().parent
COMMITTED_RESULTS = EXPERIMENTS / "results"
README = EXPERIMENTS / "README.md"

METRICS = ("micro_f1", "macro_f1", "mAP", "micro_auc", "macro_auc")
METRIC_NAMES = {
    "micro_f1": "micro-F1",
    "macro_f1": "macro-F1",
    "mAP": "mAP",
    "micro_auc": "micro-AUC",
    "macro_auc": "macro-AUC",
}
RELATION_COLORS = {
    "identical": "tab:red",
    "subset": "tab:orange",
    "superset": "tab:purple",
    "overlap": "tab:green",
    "disjoint": "lightgray",
}


def seed_values(
    results_dir,
    dataset,
    method,
    metric,
    temperature=DEFAULT_TEMPERATURE,
    setting="pretrain",
    scored_by=None,
):
    """{seed: value} over the seeds whose runs have finished, scored as `setting` scores (or
    by the results entry `scored_by`)."""
    values = {}
    for seed in SEEDS:
        run = entry_run(dataset, setting, method, seed, temperature)
        record = load_result(results_dir, run)
        if record is not None:
            values[seed] = run.score(record, scored_by)[metric]
    return values


def mean_std(values: dict) -> str:
    if not values:
        return "–"
    array = np.array(list(values.values()))
    return f"{array.mean():.4f} ± {array.std(ddof=1) if len(array) > 1 else 0:.4f}"


def paired_test(a: dict, b: dict) -> tuple[float, float, int]:
    """(mean of a - b, two-sided p of the paired t-test, n) over the seeds both have."""
    comparison = paired_effect(a, b)
    return comparison["diff"], comparison["p"], comparison["n"]


def paired_effect(a: dict, b: dict) -> dict:
    """The paired t-test of a - b over the seeds both have: the mean difference `diff`, its 95%
    interval [`low`, `high`], the two-sided `p` and `n`. NaN where the test is undefined."""
    seeds = sorted(set(a) & set(b))
    diff = np.array([a[s] - b[s] for s in seeds])
    nan = float("nan")
    result = {
        "diff": float(diff.mean()) if len(diff) else nan,
        "low": nan,
        "high": nan,
        "p": nan,
        "n": len(seeds),
    }
    if len(seeds) < 2 or np.all(diff == diff[0]):
        return result
    test = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    interval = test.confidence_interval(0.95)
    result.update(p=float(test.pvalue), low=float(interval.low), high=float(interval.high))
    return result


def metric_table(
    results_dir,
    dataset,
    methods,
    temperature=DEFAULT_TEMPERATURE,
    setting="pretrain",
    scored_by=None,
) -> list[str]:
    """A markdown table of mean ± std per method; the best mean of each column in bold."""
    cells = {
        (m, k): seed_values(results_dir, dataset, m, k, temperature, setting, scored_by)
        for m in methods
        for k in METRICS
    }
    best = {}
    for metric in METRICS:
        means = {m: np.mean(list(cells[m, metric].values())) for m in methods if cells[m, metric]}
        best[metric] = max(means, key=means.get) if means else None
    lines = [
        "| loss | " + " | ".join(METRIC_NAMES[k] for k in METRICS) + " | seeds |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for method in methods:
        row = []
        for metric in METRICS:
            text = mean_std(cells[method, metric])
            row.append(f"**{text}**" if best[metric] == method else text)
        lines.append(f"| {method} | " + " | ".join(row) + f" | {len(cells[method, 'mAP'])} |")
    return lines


def significance_line(results_dir, dataset, reference: str, other: str) -> str:
    """Paired t-tests of `reference` against `other` in three metrics, without correction."""
    parts = []
    for metric in ("mAP", "macro_f1", "micro_f1"):
        diff, p, n = paired_test(
            seed_values(results_dir, dataset, reference, metric),
            seed_values(results_dir, dataset, other, metric),
        )
        verdict = "significant" if p < 0.05 else "not significant"
        parts.append(f"{METRIC_NAMES[metric]} Δ = {diff:+.4f} (p = {p:.3f}, n = {n}, {verdict})")
    return f"{reference} − {other}, uncorrected: " + "; ".join(parts)


def strongest_competitor(results_dir, dataset, methods=COMPARED[1:]) -> str | None:
    """The best of `methods` (by default every entry other than S-D) by mean mAP over finished
    seeds (pre-training setting)."""
    means = {}
    for method in methods:
        values = seed_values(results_dir, dataset, method, "mAP")
        if values:
            means[method] = np.mean(list(values.values()))
    return max(means, key=means.get) if means else None


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def comparison_section(profile, results_dir) -> list[str]:
    lines = [
        "### 1. Comparison",
        "",
        "Test metrics (mean ± sample std over seeds) of every loss in each training setting;",
        "the best mean in each column is bold. `sd_swapped` exchanges the roles of S-D's",
        "factors, K_s = |S∩T|/|T| and K_d = 1/(1 + |S \\ T|): what ws-MulSupCon computes",
        "(docs/SPEC.md). `bce` is the same encoder trained with sigmoid BCE alone.",
        "",
    ]
    for setting, datasets in PROFILES[profile]["setting_datasets"].items():
        scored_by = SETTINGS[setting].scored_by
        lines += [
            f"#### Setting `{setting}`: {SETTINGS[setting].description}",
            "",
            f'Scored by `results["{scored_by}"]`.',
            "",
        ]
        for dataset in datasets:
            lines += [
                f"**{dataset}**",
                "",
                *metric_table(results_dir, dataset, COMPARED, setting=setting),
                "",
            ]
        lines += sd_against_each_table(results_dir, setting, datasets)
        if scored_by != "linear_eval":  # the encoder it trained, scored like the others
            lines += [
                f"**The encoders of setting `{setting}`, scored by a linear probe** "
                '(`results["linear_eval"]`), as the other settings are:',
                "",
            ]
            for dataset in datasets:
                lines += [
                    f"**{dataset}** (probe)",
                    "",
                    *metric_table(
                        results_dir, dataset, COMPARED, setting=setting, scored_by="linear_eval"
                    ),
                    "",
                ]
            lines += sd_against_each_table(results_dir, setting, datasets, "linear_eval")
    return lines


def effect_cell(effect: dict, adjusted_p: float) -> str:
    """`diff[*] [low, high] (p = …)`: a paired effect, `*` where the corrected p < 0.05."""
    if effect["n"] == 0:
        return "–"
    mark = "*" if adjusted_p < 0.05 else ""
    return (
        f"{effect['diff']:+.4f}{mark} [{effect['low']:+.4f}, {effect['high']:+.4f}] "
        f"(p = {adjusted_p:.2f})"
    )


def sd_against_each_table(
    results_dir, setting: str, datasets, scored_by=None, others=None, subject=None
) -> list[str]:
    """S-D's mAP minus each of `others`' (by default every other entry), per dataset, with
    Holm-corrected paired tests: the paper's claim is against each. Scored as `setting`
    scores, or by `scored_by`. `subject` names the others in the table's title."""
    others = others or [m for m in COMPARED if m != "sd"]
    effects = {}
    for dataset in datasets:
        reference = seed_values(
            results_dir, dataset, "sd", "mAP", setting=setting, scored_by=scored_by
        )
        for other in others:
            values = seed_values(
                results_dir, dataset, other, "mAP", setting=setting, scored_by=scored_by
            )
            effects[dataset, other] = paired_effect(reference, values)
    adjusted = dict(zip(effects, holm_adjusted([e["p"] for e in effects.values()]), strict=True))
    name = f"`{setting}`" + (f", scored by `{scored_by}`" if scored_by else "")
    lines = [
        f"**S-D against {subject or 'each entry'} ({name})**: mean mAP of `sd` minus the "
        "entry's over",
        "paired seeds, its 95% interval (paired t), and the p-value after a Holm correction over",
        f"all {len(effects)} comparisons of this table; `*` marks a Holm-corrected p < 0.05.",
        "",
        "| dataset | " + " | ".join(others) + " |",
        "|---" * (len(others) + 1) + "|",
    ]
    for dataset in datasets:
        cells = [effect_cell(effects[dataset, o], adjusted[dataset, o]) for o in others]
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def ablation_section(results_dir) -> list[str]:
    lines = [
        "### 2. Ablation: the two factors of S-D",
        "",
        "`sd_similarity_only` keeps K_s = |S∩T|/|S| and `sd_dissimilarity_only` keeps",
        "K_d = 1/(1 + |T \\ S|); `sd` multiplies them (docs/SPEC.md; S is the anchor's label set).",
        "Pre-training setting.",
        "",
    ]
    for dataset in DATASETS:
        lines += [f"**{dataset}**", "", *metric_table(results_dir, dataset, ("sd", *ABLATIONS)), ""]
        for ablation in ABLATIONS:
            if seed_values(results_dir, dataset, ablation, "mAP"):
                lines += [significance_line(results_dir, dataset, "sd", ablation), ""]
    lines += sd_against_each_table(
        results_dir, "pretrain", DATASETS, others=ABLATIONS, subject="each factor alone"
    )
    return lines


def temperature_section(profile, results_dir, figure_path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = PROFILES[profile]["temperature_datasets"]
    baselines = {d: best_baseline(profile, results_dir, d) for d in datasets}
    effects = {
        (d, t): paired_effect(
            seed_values(results_dir, d, "sd", "mAP", t),
            seed_values(results_dir, d, baselines[d], "mAP", t),
        )
        for d in datasets
        if baselines[d]
        for t in TEMPERATURES
    }
    adjusted = dict(zip(effects, holm_adjusted([e["p"] for e in effects.values()]), strict=True))
    lines = [
        "### 3. Temperature",
        "",
        "Test mAP (mean ± std over seeds) against τ, for S-D and for the best contrastive",
        "baseline of the comparison on that dataset, and S-D's mAP minus the baseline's over",
        "paired seeds with its 95% interval and the p-value after a Holm correction over all",
        f"{sum(not np.isnan(e['p']) for e in effects.values())} τ comparisons of this section.",
        "",
    ]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        baseline = baselines[dataset]
        methods = ("sd", baseline) if baseline else ("sd",)
        lines += [
            f"**{dataset}**",
            "",
            "| τ | " + " | ".join(f"{m} mAP" for m in methods) + " | sd − baseline |",
            "|---" * (len(methods) + 2) + "|",
        ]
        for temperature in TEMPERATURES:
            values = [seed_values(results_dir, dataset, m, "mAP", temperature) for m in methods]
            key = (dataset, temperature)
            difference = effect_cell(effects[key], adjusted[key]) if key in effects else "–"
            cells = [mean_std(v) for v in values]
            lines.append(f"| {temperature:g} | " + " | ".join(cells) + f" | {difference} |")
        lines.append("")
        for method in methods:
            points = [
                (t, list(seed_values(results_dir, dataset, method, "mAP", t).values()))
                for t in TEMPERATURES
            ]
            points = [(t, v) for t, v in points if v]
            if points:
                ax.errorbar(
                    [t for t, _ in points],
                    [np.mean(v) for _, v in points],
                    yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for _, v in points],
                    marker="o",
                    capsize=3,
                    label=method,
                )
        ax.set(xscale="log", xlabel="temperature τ", ylabel="test mAP", title=dataset)
        ax.set_xticks(TEMPERATURES, [f"{t:g}" for t in TEMPERATURES])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(figure_path, dpi=110)
    plt.close(fig)
    lines += [f"![mAP against temperature]({figure_path.name})", ""]
    return lines


def longest_tail_dataset(results_dir) -> str | None:
    """The dataset whose training labels are most imbalanced (max count / min count)."""
    ratios = {}
    for dataset in DATASETS:
        record = load_result(results_dir, Run(dataset, "sd", SEEDS[0]))
        if record:
            counts = np.array(record["train_label_counts"], float)
            ratios[dataset] = counts.max() / max(counts.min(), 1.0)
    return max(ratios, key=ratios.get) if ratios else None


def seed_averaged_replicates(results_dir, dataset, method, group, metric) -> np.ndarray | None:
    """[1 + R]: the point estimate and bootstrap replicates, averaged over finished seeds."""
    records = [load_result(results_dir, Run(dataset, method, s)) for s in SEEDS]
    records = [r for r in records if r is not None]
    if not records:
        return None
    return np.mean([r["group_bootstrap"][group][metric] for r in records], axis=0)


def interval(replicates: np.ndarray) -> str:
    low, high = np.percentile(replicates[1:], [2.5, 97.5])
    return f"{replicates[0]:.4f} [{low:.4f}, {high:.4f}]"


def longtail_section(results_dir, figure_path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = longest_tail_dataset(results_dir)
    if dataset is None:
        return ["### 4. Long tail", "", "No finished runs yet.", ""]
    record = load_result(results_dir, Run(dataset, "sd", SEEDS[0]))
    counts = np.array(record["train_label_counts"])
    groups = record["label_groups"]
    lines = [
        "### 4. Long tail",
        "",
        f"On **{dataset}**, the dataset with the most imbalanced training labels (the most",
        f"frequent label has {counts.max()} training examples, the rarest {counts.min()}). Its",
        "labels are split into thirds by training frequency; each cell is the seed-averaged",
        "value with its 95% bootstrap interval over test examples.",
        "",
        "| group | labels | training examples per label |",
        "|---|---|---|",
    ]
    for group, members in groups.items():
        group_counts = counts[members]
        lines.append(f"| {group} | {len(members)} | {group_counts.min()}–{group_counts.max()} |")
    lines.append("")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, metric in zip(axes, ("macro_f1", "mAP"), strict=True):
        lines += [
            f"**{METRIC_NAMES[metric]}**",
            "",
            "| loss | " + " | ".join(groups) + " |",
            "|---" * (len(groups) + 1) + "|",
        ]
        width = 0.8 / len(COMPARED)
        for i, method in enumerate(COMPARED):
            cells, heights, errors = [], [], []
            for group in groups:
                replicates = seed_averaged_replicates(results_dir, dataset, method, group, metric)
                if replicates is None:
                    cells.append("–")
                    heights.append(np.nan)
                    errors.append((0, 0))
                    continue
                cells.append(interval(replicates))
                low, high = np.percentile(replicates[1:], [2.5, 97.5])
                heights.append(replicates[0])
                errors.append((replicates[0] - low, high - replicates[0]))
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
            ax.bar(
                np.arange(len(groups)) + i * width,
                heights,
                width,
                yerr=np.array(errors).T,
                capsize=2,
                label=method,
            )
        lines.append("")
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, list(groups))
        ax.set(ylabel=f"test {METRIC_NAMES[metric]}", title=f"{dataset}: {METRIC_NAMES[metric]}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=110)
    plt.close(fig)
    rivals = {strongest_competitor(results_dir, dataset): "the strongest other entry by mAP"}
    contrastive = [m for m in COMPARED[1:] if m != "bce"]
    rivals.setdefault(  # only where it is another method than the first
        strongest_competitor(results_dir, dataset, contrastive),
        "the strongest other contrastive loss",
    )
    for rival, description in rivals.items():
        if rival is None:
            continue
        lines += [f"Paired bootstrap, sd − {rival} ({description}):", ""]
        for metric in ("macro_f1", "mAP"):
            parts = []
            for group in groups:
                ours = seed_averaged_replicates(results_dir, dataset, "sd", group, metric)
                theirs = seed_averaged_replicates(results_dir, dataset, rival, group, metric)
                if ours is None or theirs is None:
                    continue
                diff = ours - theirs
                low, high = np.percentile(diff[1:], [2.5, 97.5])
                verdict = "significant" if low > 0 or high < 0 else "not significant"
                parts.append(f"{group} {diff[0]:+.4f} [{low:+.4f}, {high:+.4f}] ({verdict})")
            lines.append(f"- {METRIC_NAMES[metric]}: " + "; ".join(parts))
        lines.append("")
    lines += [f"![long-tail groups]({figure_path.name})", ""]
    return lines


def choose_anchor(labels: np.ndarray, relations: np.ndarray) -> int:
    """The example whose relations to the others are most balanced over the five kinds."""
    counts = np.stack([(relations == r).sum(axis=1) for r in range(5)], axis=1)
    return int(np.argmax(counts.min(axis=1)))


def tsne_section(results_dir, figure_path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from sdjax.losses import Relation, label_relations

    paths = {m: results_dir / "embeddings" / f"{TSNE_DATASET}_{m}.npz" for m in TSNE_METHODS}
    if not all(path.exists() for path in paths.values()):
        return ["### 5. Embeddings", "", "Not run yet.", ""]
    lines = [
        "### 5. Embeddings",
        "",
        f"t-SNE (sklearn, perplexity 30, PCA init, seed 0) of {TSNE_DATASET} test features",
        "(seed 0). Points are coloured by how their label set relates to one anchor's (the star),",
        "chosen as the test example whose five relation counts are the most balanced. The table",
        "gives the mean cosine similarity to the anchor in the encoder's own feature space.",
        "",
        "| loss | " + " | ".join(RELATION_COLORS) + " |",
        "|---" * (len(RELATION_COLORS) + 1) + "|",
    ]
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 5.5))
    for ax, (method, path) in zip(axes, paths.items(), strict=True):
        data = np.load(path)
        features, labels = data["features"].astype(np.float32), data["labels"]
        relations = np.asarray(label_relations(labels))
        anchor = choose_anchor(labels, relations)
        relation = relations[anchor]
        normed = features / np.linalg.norm(features, axis=1, keepdims=True)
        cosine = normed @ normed[anchor]
        cells = []
        for code in range(len(RELATION_COLORS)):
            members = (relation == code) & (np.arange(len(relation)) != anchor)
            cells.append(f"{cosine[members].mean():.3f} (n={members.sum()})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        points = TSNE(perplexity=30, init="pca", random_state=0).fit_transform(features)
        others = np.arange(len(relation)) != anchor
        for code, (name, color) in reversed(list(enumerate(RELATION_COLORS.items()))):
            members = (relation == code) & others
            ax.scatter(*points[members].T, s=6, c=color, label=f"{name} ({members.sum()})")
        ax.legend(fontsize=7, markerscale=2)
        # Drawn after the legend so that the big star stays out of it.
        ax.scatter(*points[anchor], s=250, marker="*", c="black", edgecolors="white")
        anchor_labels = ", ".join(str(c) for c in np.flatnonzero(labels[anchor]))
        ax.set(title=f"{method}: anchor ★ has labels {{{anchor_labels}}}", xticks=[], yticks=[])
    assert [r.name.lower() for r in Relation] == list(RELATION_COLORS)
    fig.tight_layout()
    fig.savefig(figure_path, dpi=110)
    plt.close(fig)
    lines += ["", f"![t-SNE by relation]({figure_path.name})", ""]
    return lines


def runs_table(profile, results_dir) -> tuple[list[str], list[dict], int]:
    """The table of the profile's planned runs that finished, their records, and how many
    result files lie outside the plan (left by a plan that has since changed, such as the
    temperature sweep of a former best baseline): those are neither listed nor counted."""
    planned = plan(profile, results_dir, [])
    records = [r for r in (load_result(results_dir, run) for run in planned) if r is not None]
    records.sort(key=lambda r: Run(**r["run"]).name)
    unplanned = len(list((results_dir / "runs").rglob("*.json"))) - len(records)
    lines = ["| run | mAP | wall time (s) | hardware |", "|---|---|---|---|"]
    for r in records:
        run = Run(**r["run"])
        lines.append(
            f"| {run.name} | {run.score(r)['mAP']:.4f} | {r['wall_seconds']:.0f} | "
            f"{r['hardware']} |"
        )
    return lines, records, unplanned


def write_report(profile: str, results_dir: Path, readme: Path | None = None) -> None:
    """Rebuilds the report of `profile` in `results_dir`, and puts it between its markers in
    `readme` if one is given."""
    results_dir.mkdir(parents=True, exist_ok=True)
    runs, records, unplanned = runs_table(profile, results_dir)
    total_seconds = sum(r["wall_seconds"] for r in records)
    hardware = {r["hardware"] for r in records}
    (results_dir / "runs.md").write_text(
        f"# Every finished run of the {profile} profile\n\n" + "\n".join(runs) + "\n"
    )
    body = [
        f"## Appendix: results of the `{profile}` profile (tuned on test)",
        "",
        f"{len(records)} finished runs, {total_seconds / 3600:.2f} h of run time in all, on "
        f"{'; '.join(sorted(hardware)) or '–'}. Every run's wall time and hardware: "
        f"[results/{profile}/runs.md](results/{profile}/runs.md)."
        + (
            f" Not counted: {unplanned} result file(s) outside the profile's plan."
            if unplanned
            else ""
        ),
        "",
        *comparison_section(profile, results_dir),
        *ablation_section(results_dir),
        *temperature_section(profile, results_dir, results_dir / "temperature.png"),
        *longtail_section(results_dir, results_dir / "longtail.png"),
        *tsne_section(results_dir, results_dir / "tsne.png"),
    ]
    body = [re.sub(r"\(([a-z]+\.png)\)", rf"(results/{profile}/\1)", line) for line in body]
    # report.md lies in results_dir itself, so its links drop the results/{profile}/ prefix.
    report = "\n".join(body).replace(f"(results/{profile}/", "(")
    (results_dir / "report.md").write_text(report + "\n")
    if readme is not None:
        write_readme_block(readme, profile, body)


def write_readme_block(readme: Path, profile: str, body: list[str]) -> None:
    """Puts `body` between the profile's markers in `readme` (at its end if it has none)."""
    text = readme.read_text() if readme.exists() else ""
    begin, end = f"<!-- report:{profile}:begin -->", f"<!-- report:{profile}:end -->"
    block = f"{begin}\n" + "\n".join(body) + f"\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)


FLAGS = flags.FLAGS


def incomplete_profile_message(profile: str, results_dir: Path, missing: list[Run]) -> str:
    planned = plan(profile, results_dir, [])
    return (
        f"The {profile} profile in {results_dir} is incomplete: {len(missing)} of {len(planned)} "
        f"runs have no result file (e.g. {missing[0].name}). A report is only built from a "
        "complete profile; finish it with `python -m experiments.run_experiments "
        f"--profile={profile} --results_dir={results_dir.parent}`."
    )


def main(argv):
    del argv
    from experiments import protocol_report
    from experiments.protocol import PROTOCOLS

    known = [*PROFILES, *PROTOCOLS]
    unknown = set(FLAGS.profiles) - set(known)
    if unknown:
        raise app.UsageError(f"--profiles: got {sorted(unknown)}, expected some of {known}")
    results_root = Path(FLAGS.results_dir).resolve()
    profiles = FLAGS.profiles or [p for p in known if (results_root / p / "runs").is_dir()]
    for profile in list(profiles):  # all complete, or nothing is written
        results_dir = results_root / profile
        if profile in PROTOCOLS:
            missing = protocol_report.missing_runs(
                profile, results_dir, protocol_report.uses_moco(results_dir)
            )
            if missing and not FLAGS.profiles:  # by default, one still running is left out
                print(f"left out: {profile}, {len(missing)} runs still missing", flush=True)
                profiles.remove(profile)
            elif missing:
                sys.exit(
                    f"The {profile} profile in {results_dir} is incomplete: {len(missing)} "
                    f"runs missing (e.g. {missing[0]}); finish it with `python -m "
                    f"experiments.run_experiments --profile={profile} "
                    f"--results_dir={results_root}`."
                )
            continue
        missing = missing_runs(profile, results_dir)
        if missing:
            sys.exit(incomplete_profile_message(profile, results_dir, missing))
    if not profiles:
        sys.exit(
            f"No complete profile has result files in {results_root}; expected <profile>/runs/."
        )
    committed = results_root == COMMITTED_RESULTS.resolve()
    for profile in profiles:
        build = protocol_report.write_report if profile in PROTOCOLS else write_report
        build(profile, results_root / profile, README if committed else None)
        print(f"wrote {results_root / profile / 'report.md'}", flush=True)
    if committed:
        print(f"wrote the {', '.join(profiles)} report(s) into {README}")
    else:
        print(f"{README} is not changed: it shows the committed results in {COMMITTED_RESULTS}.")


if __name__ == "__main__":
    # Defined here, not on import: run_experiments imports this module and has its own flags.
    flags.DEFINE_list(
        "profiles", [], "The profiles whose report to rebuild; default: every one with results."
    )
    flags.DEFINE_string("results_dir", str(COMMITTED_RESULTS), "Holds one directory per profile.")
    app.run(main)
