"""The experiment suite's planning, skipping and report, on result files written here."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

# The repository root, where the `experiments` package is, for a bare `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import budgets, debtags_model, experiment_report, suite

METRICS = experiment_report.METRICS


def fake_record(run, value, probe_value=-1.0):
    """A result file whose scoring metrics are all `value`; its other metrics are -1, or
    `probe_value` for the linear probe of a run that its classifier scores."""
    groups = {"head": [0], "medium": [1], "tail": [2]}
    bootstrap = {g: {"macro_f1": [value] * 11, "mAP": [value] * 11} for g in groups}
    scored_by = suite.SETTINGS[run.setting].scored_by
    probe = value if scored_by == "linear_eval" else probe_value
    return {
        "run": dataclasses.asdict(run),
        "linear_eval": {k: probe for k in METRICS},
        "classifier": {k: value if scored_by == "classifier" else -1.0 for k in METRICS},
        "train_label_counts": [100, 10, 1] if run.dataset == "debtags" else [5, 5, 5],
        "label_groups": groups,
        "group_bootstrap": bootstrap,
        "wall_seconds": 2.0,
        "hardware": "cpu, 2 cores",
    }


def write(results_dir, run, value, probe_value=-1.0):
    path = suite.result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fake_record(run, value, probe_value)))


def test_plan_skips_nothing_it_needs_and_adds_the_best_baseline_sweep(tmp_path):
    runs = suite.plan("quick", tmp_path, [])
    assert len(runs) == len(set(runs))
    comparison = [r for r in runs if r.temperature == suite.DEFAULT_TEMPERATURE]
    # Pre-training: 7 compared + 2 ablations, 4 datasets, 3 seeds. MoCo and joint on yeast:
    # 6 contrastive losses each, and joint's own BCE (MoCo's BCE is pre-training's).
    assert len(comparison) == 4 * (7 + 2) * 3 + (6 + 7) * 3
    assert {r.setting for r in comparison if r.dataset != "yeast"} == {"pretrain"}
    assert suite.entry_run("yeast", "moco", "bce", 1) == suite.Run("yeast", "bce", 1)
    assert suite.Run("yeast", "bce", 1, setting="joint") in runs
    assert {r.method for r in runs if r.temperature != suite.DEFAULT_TEMPERATURE} == {"sd"}
    full = suite.plan("full", tmp_path, ["comparison"])
    assert len(full) == 4 * (7 + 6 + 7) * 5 and {r.seed for r in full} == set(suite.SEEDS)
    for run in comparison:  # the baselines on yeast finish: "jaccard" is the best
        if run.dataset == "yeast" and run.method in suite.BASELINES:
            write(tmp_path, run, 0.6 if run.method == "jaccard" else 0.5)
    swept = {r.method for r in suite.plan("quick", tmp_path, []) if r.temperature != 0.1}
    assert swept == {"sd", "jaccard"}
    only_yeast = suite.plan("quick", tmp_path, [], ["yeast"])
    assert only_yeast == [r for r in suite.plan("quick", tmp_path, []) if r.dataset == "yeast"]
    with pytest.raises(ValueError, match=r"datasets: unknown \['imagenet'\]"):
        suite.plan("quick", tmp_path, [], ["imagenet"])


def test_the_runner_lists_its_plan_from_the_command_line(tmp_path):
    # `python -m experiments.run_experiments ...` with the repository on the path, here from
    # another directory: the config files are found through sdjax, not the working directory.
    finished = suite.Run("yeast", "sd", 0)
    write(tmp_path / "quick", finished, 0.5)
    planned = len(suite.plan("quick", tmp_path / "quick", []))
    repository = Path(suite.__file__).resolve().parents[1]
    listing = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run_experiments",
            "--profile=quick",
            "--dry_run",
            f"--results_dir={tmp_path}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repository)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert f"{planned} runs planned, {planned - 1} to do." in listing
    assert f"done   {finished.name}\n" in listing
    assert f"to do  {suite.Run('yeast', 'sd', 1).name}\n" in listing


def holm_by_hand(p_values):
    """Holm's step-down adjustment, written out: the k-th smallest p times (m - k), running max."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def test_holm_adjustment_and_paired_interval():
    p_values = [0.01, 0.04, 0.03, 0.2, float("nan")]
    expected = holm_by_hand(np.array(p_values[:4]))
    adjusted = experiment_report.holm_adjusted(p_values)
    np.testing.assert_allclose(adjusted[:4], expected, rtol=1e-12)
    assert np.isnan(adjusted[4])
    a, b = {0: 0.71, 1: 0.69, 2: 0.74, 3: 0.70}, {0: 0.65, 1: 0.66, 2: 0.70, 3: 0.69, 4: 0.1}
    diff = np.array([a[s] - b[s] for s in range(4)])
    half_width = stats.t.ppf(0.975, 3) * diff.std(ddof=1) / np.sqrt(4)
    effect = experiment_report.paired_effect(a, b)  # seed 4 is not paired
    assert effect["n"] == 4
    np.testing.assert_allclose(
        [effect["diff"], effect["low"], effect["high"]],
        [diff.mean(), diff.mean() - half_width, diff.mean() + half_width],
        rtol=1e-12,
    )


def test_seed_summary_against_the_reference():
    values, reference = [0.461, 0.466, 0.463, 0.468, 0.462], 0.4627
    mean, sem = np.mean(values), np.std(values, ddof=1) / np.sqrt(5)
    t_statistic = (mean - reference) / sem
    summary = debtags_model.against_reference(values, reference)
    np.testing.assert_allclose(
        [summary["mean"], *summary["interval_95"], summary["p_vs_reference"]],
        [
            mean,
            mean - stats.t.ppf(0.975, 4) * sem,
            mean + stats.t.ppf(0.975, 4) * sem,
            2 * stats.t.sf(abs(t_statistic), 4),
        ],
        rtol=1e-12,
    )
    assert (summary["min"], summary["max"]) == (0.461, 0.468)
    assert "interval_95" not in debtags_model.against_reference([0.47], reference)


@pytest.mark.slow
def test_report_means_bold_and_holm_corrected_tests(tmp_path):
    rng = np.random.default_rng(0)
    values, probes = {}, {}  # probes: the linear probes of classifier-scored (joint) runs
    for run in suite.plan("quick", tmp_path, ["comparison", "ablation"]):
        base = {"sd": 0.70, "bce": 0.65, "all": 0.60}.get(run.method, 0.5)
        values[run] = base + 0.01 * rng.standard_normal()
        if suite.SETTINGS[run.setting].scored_by == "classifier":
            probes[run] = 0.4 + 0.02 * (run.method == "sd") + 0.01 * rng.standard_normal()
        write(tmp_path, run, values[run], probes.get(run, -1.0))
    # The sweep follows the comparison's best baseline (`all`); planned once that is known.
    for run in suite.plan("quick", tmp_path, ["temperature"]):
        if run not in values:
            values[run] = 0.60 + 0.1 * (run.method == "sd") + 0.01 * rng.standard_normal()
            write(tmp_path, run, values[run])
    for method in suite.TSNE_METHODS:
        path = tmp_path / "embeddings" / f"{suite.TSNE_DATASET}_{method}.npz"
        path.parent.mkdir(exist_ok=True)
        labels = (rng.random((120, 10)) < 0.3).astype(np.uint8)
        np.savez(path, features=rng.standard_normal((120, 8)), labels=labels)
    # A sweep of a baseline that is no longer the best one: outside the plan, so not reported.
    unplanned = suite.Run("yeast", "any", 0, temperature=0.5)
    write(tmp_path, unplanned, 0.9)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n<!-- report:quick:begin -->\nold\n<!-- report:quick:end -->\n")
    experiment_report.write_report("quick", tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("intro") and "\nold\n" not in text and text.count("report:quick") == 2
    assert unplanned.name not in (tmp_path / "runs.md").read_text()  # its count: at the end
    assert f"{len(values)} finished runs" in text
    assert "Not counted: 1 result file(s) outside the profile's plan." in text
    seeds = suite.profile_seeds("quick")

    def entry(dataset, method, setting="pretrain", scores=values, temperature=None):
        return [scores[suite.entry_run(dataset, setting, method, s, temperature)] for s in seeds]

    def effect_cell(a, b, adjusted_p):
        diff = np.array(a) - np.array(b)
        half_width = stats.t.ppf(0.975, len(seeds) - 1) * diff.std(ddof=1) / np.sqrt(len(seeds))
        return (
            f"{diff.mean():+.4f}{'*' if adjusted_p < 0.05 else ''} "
            f"[{diff.mean() - half_width:+.4f}, {diff.mean() + half_width:+.4f}] "
            f"(p = {adjusted_p:.2f})"
        )

    sd = entry("yeast", "sd")
    row = f"| sd | **{np.mean(sd):.4f} ± {np.std(sd, ddof=1):.4f}**"
    assert row in text
    ablation = entry("yeast", "sd_similarity_only")
    p = stats.ttest_rel(sd, ablation).pvalue
    assert f"mAP Δ = {np.mean(sd) - np.mean(ablation):+.4f} (p = {p:.3f}, n = 3" in text
    # The temperature table pairs sd with the best baseline (`all`) at each τ, Holm over the
    # section's comparisons (yeast's five τ in the quick profile).
    sweep = {
        t: (entry("yeast", "sd", temperature=t), entry("yeast", "all", temperature=t))
        for t in suite.TEMPERATURES
    }
    raw = [stats.ttest_rel(a, b).pvalue for a, b in sweep.values()]
    for (temperature, pair), adjusted_p in zip(
        sweep.items(), holm_by_hand(np.array(raw)), strict=True
    ):
        tau_row = next(
            line for line in text.splitlines() if line.startswith(f"| {temperature:g} | ")
        )
        assert tau_row.endswith(f"| {effect_cell(*pair, adjusted_p)} |"), temperature
    assert "Holm correction over all\n5 τ comparisons" in text
    # Each setting's S-D-against-each table: Holm over all its cells; yeast's row is checked.
    # The joint setting's table is followed by one of its encoders' linear probes, and the
    # ablation's by S-D against each factor alone.
    compared = [m for m in suite.COMPARED if m != "sd"]
    yeast_rows = [line for line in text.splitlines() if line.startswith("| yeast | ")]
    tables = [
        (setting, values, compared, suite.PROFILES["quick"]["setting_datasets"][setting])
        for setting in suite.SETTINGS
    ]
    tables += [
        ("joint", probes, compared, suite.PROFILES["quick"]["setting_datasets"]["joint"]),
        ("pretrain", values, suite.ABLATIONS, suite.DATASETS),
    ]
    assert len(yeast_rows) == len(tables)
    for (setting, scores, others, datasets), yeast_row in zip(tables, yeast_rows, strict=True):
        raw = {
            (d, o): stats.ttest_rel(
                entry(d, "sd", setting, scores), entry(d, o, setting, scores)
            ).pvalue
            for d in datasets
            for o in others
        }
        adjusted = dict(zip(raw, holm_by_hand(np.array(list(raw.values()))), strict=True))
        for column, other in enumerate(others):
            cell = effect_cell(
                entry("yeast", "sd", setting, scores),
                entry("yeast", other, setting, scores),
                adjusted["yeast", other],
            )
            assert yeast_row.strip(" |").split(" | ")[1 + column] == cell, (setting, other)
    assert "**S-D against each factor alone (`pretrain`)**" in text
    probe_sd = entry("yeast", "sd", "joint", probes)
    probe_table = text.split("**yeast** (probe)")[1]
    assert f"| sd | **{np.mean(probe_sd):.4f} ± {np.std(probe_sd, ddof=1):.4f}**" in probe_table
    assert "On **debtags**" in text  # the most imbalanced labels
    # S-D against the strongest entry (BCE) and, since that is not contrastive, the strongest
    # contrastive loss; every bootstrap replicate of a fake run is its value.
    for rival, description in [
        ("bce", "the strongest other entry by mAP"),
        ("all", "the strongest other contrastive loss"),
    ]:
        diff = np.mean(entry("debtags", "sd")) - np.mean(entry("debtags", rival))
        block = text.split(f"Paired bootstrap, sd − {rival} ({description}):")[1]
        mean_ap_line = next(line for line in block.splitlines() if line.startswith("- mAP:"))
        assert f"tail {diff:+.4f} [{diff:+.4f}, {diff:+.4f}] (significant)" in mean_ap_line
    for figure in ("temperature.png", "longtail.png", "tsne.png"):
        assert (tmp_path / figure).stat().st_size > 5000
    assert len((tmp_path / "runs.md").read_text().splitlines()) == 2 + 2 + len(values)


@pytest.mark.parametrize("dataset", suite.DATASETS)
def test_gpu_profile_is_larger_and_in_bfloat16(dataset):
    from sdjax import config_lib

    full = budgets.load_config(suite.CONFIG_FILES[dataset])
    gpu = budgets.load_config(suite.CONFIG_FILES[dataset], "gpu")
    config_lib.check_config(gpu, num_devices=1, num_processes=1)
    assert gpu.compute_dtype == "bfloat16" and full.compute_dtype == "float32"
    assert gpu.num_train_steps >= 4 * full.num_train_steps
    assert gpu.batch_size >= full.batch_size
    wider = {  # each encoder's size field grows
        "resnet": lambda e: (e.width, sum(e.stage_sizes)),
        "mlp": lambda e: (max(e.hidden_sizes), len(e.hidden_sizes)),
        "transformer": lambda e: (e.width, e.depth),
        "bag_of_ngrams": lambda e: (e.width, e.num_buckets),
    }[gpu.model.encoder.name]
    assert all(
        g > f for g, f in zip(wider(gpu.model.encoder), wider(full.model.encoder), strict=True)
    )


def test_anchor_choice_balances_the_relations():
    # Row 0 has every relation at least once; row 1 lacks three of them.
    relations = np.array([[0, 1, 2, 3, 4, 4], [0, 0, 0, 4, 4, 4]])
    assert experiment_report.choose_anchor(None, relations) == 0
    assert experiment_report.choose_anchor(None, relations[::-1]) == 1


@pytest.mark.parametrize("profile", sorted(suite.PROFILES))
def test_every_suite_profile_has_a_budget_for_each_of_its_datasets(profile):
    from sdjax import config_lib

    config_profile = suite.PROFILES[profile]["config_profile"]
    for dataset, config_file in suite.CONFIG_FILES.items():
        own = config_lib.load_config_file(config_file)
        config = budgets.load_config(config_file, config_profile)
        config_lib.check_config(config, num_devices=1, num_processes=1)
        changed = {
            field
            for field, value in config_lib.flat_fields(config).items()
            if config_lib.flat_fields(own)[field] != value
        }
        # A budget changes what it lists and nothing else; "" is the file as it is.
        expected = budgets.BUDGETS.get(config_profile, {}).get(config_file, {})
        assert changed <= {*expected, "compute_dtype"} and (config_profile or not changed), (
            dataset,
            changed,
        )
        assert config.dataset.name == own.dataset.name == dataset


def test_a_budget_without_the_config_file_is_one_line():
    from sdjax import config_lib

    with pytest.raises(
        config_lib.ConfigError,
        match=r"^config_profile: got 'quick', but the suite has no such budget for voc2007; ",
    ):
        budgets.load_config("voc2007", "quick")
    with pytest.raises(config_lib.ConfigError, match=r"^profile: got 'quick', expected one of"):
        config_lib.load_config_file("yeast", "quick")  # budgets are not config-file profiles


def test_the_packages_docstring_names_every_experiment_module():
    package = Path(suite.__file__).parent
    modules = {path.stem for path in package.glob("*.py")} - {"__init__"}
    listed = set(re.findall(r"^- `(\w+)`:", (package / "__init__.py").read_text(), re.M))
    assert listed == modules


@pytest.mark.parametrize("budget", sorted(budgets.BUDGETS))
def test_every_budget_of_every_config_file_passes_the_checks(budget):
    from sdjax import config_lib

    for config_file, overrides in budgets.BUDGETS[budget].items():
        config = budgets.load_config(config_file, budget)
        config_lib.check_config(config, num_devices=1, num_processes=1)
        flat = config_lib.flat_fields(config)
        assert all(
            flat[field] == json.loads(json.dumps(value)) for field, value in overrides.items()
        )


@pytest.fixture(scope="module")
def joint_text_model():
    """A joint model of configs/debtags.py:tiny with dropout 0.5, and a batch of its tokens."""
    from sdjax import config_lib, objectives

    config = budgets.load_config(suite.CONFIG_FILES["debtags"], "tiny")
    config = config_lib.override(config, method="joint", **{"model.encoder.dropout_rate": 0.5})
    model = objectives.Joint(config).create_model(num_classes=5)
    tokens = np.random.default_rng(0).integers(1, 256, size=(6, 32), dtype=np.int32)
    return config, model, tokens


def bce_grads(model, tokens, reads):
    """Gradients of the BCE of `joint_head.joint_outputs(reads)`'s logits (labels all 1)."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from experiments import joint_head

    outputs = joint_head.joint_outputs(reads)

    def bce(model):
        logits = outputs(None, model, tokens)["logits"]
        return optax.sigmoid_binary_cross_entropy(logits, jnp.ones_like(logits)).mean()

    return nnx.grad(bce)(model)


def largest(tree) -> float:
    import jax

    return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


def test_a_detached_joint_classifier_sends_no_gradient_into_the_encoder(joint_text_model):
    _, model, tokens = joint_text_model
    attached, detached = bce_grads(model, tokens, "features"), bce_grads(model, tokens, "detached")
    assert largest(attached["encoder"]) > 1e-4
    assert largest(detached["encoder"]) == 0.0
    assert largest(detached["classifier"]) > 1e-4


def test_a_joint_classifier_without_dropout_reads_the_probes_features(joint_text_model):
    from experiments import joint_head
    from sdjax import models

    _, model, tokens = joint_text_model
    logits = joint_head.joint_outputs("features_without_dropout")(None, model, tokens)["logits"]
    expected = model.classifier(models.evaluation_view(model).encode(tokens))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
    dropped = joint_head.joint_outputs("features")(None, model, tokens)["logits"]
    assert not np.allclose(np.asarray(dropped), np.asarray(expected))  # dropout 0.5 is on


def test_the_optimizer_without_classifier_decay_decays_every_other_matrix(joint_text_model):
    """Zero gradients: AdamW's update is its decay alone, lr x weight decay x the parameter."""
    import jax
    from flax import nnx

    from experiments import joint_head
    from sdjax import objectives

    config, model, _ = joint_text_model
    model = nnx.clone(model)
    optimizer = objectives.create_optimizer(
        config, model, decay_mask=joint_head.decayed_outside_classifier
    )
    before = nnx.clone(model)
    zeros = jax.tree.map(np.zeros_like, nnx.state(model, nnx.Param))
    for _ in range(config.optimizer.warmup_steps + 1):  # past the warm-up's zero rate
        optimizer.update(model, zeros)
    kernel, kernel_before = (
        model.classifier.linear.kernel[...],
        before.classifier.linear.kernel[...],
    )
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(kernel_before))
    embedding = np.asarray(model.encoder.token_embedding.embedding[...])
    embedding_before = np.asarray(before.encoder.token_embedding.embedding[...])
    assert np.all(np.abs(embedding) < np.abs(embedding_before) + 1e-12)
    assert not np.array_equal(embedding, embedding_before)


def test_the_step_profile_sorts_the_programs_operations_into_kinds(tmp_path):
    """A traced program of one matmul and one elementwise fusion: the matmul's time is a
    "convolutions and matmuls", the fusion's "everything else", the runtime's events neither."""
    import jax
    import jax.numpy as jnp

    from experiments import profile_train_step

    program = jax.jit(lambda a: jnp.tanh(a @ a) + 1.0)
    matrix = jnp.ones((256, 256))
    program(matrix).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            program(matrix).block_until_ready()
    events = profile_train_step.trace_events(tmp_path)
    operations = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    matmuls = [e for e in operations if e["args"]["hlo_op"].startswith(("ynn", "dot"))]
    others = [e for e in operations if e not in matmuls]
    assert len(matmuls) == 2 and len(others) == 2, [e["name"] for e in operations]
    runtime = [e for e in events if e.get("ph") == "X" and e not in operations]
    assert sum(e["dur"] for e in runtime if not e["name"].startswith("$")) > 0  # dispatch etc.

    kinds = profile_train_step.xla_operation_ms(events, steps=2)
    assert kinds == pytest.approx(
        {
            "convolutions and matmuls": sum(e["dur"] for e in matmuls) / 1e3 / 2,
            "everything else": sum(e["dur"] for e in others) / 1e3 / 2,
        }
    )


def test_the_step_profile_reads_each_dot_of_a_program_and_times_it_in_the_trace(tmp_path):
    """A program with a plain and a batched matmul: `compiled_dots` finds both with their
    operands' shapes and FLOPs, its dimension numbers recompute each product, and each dot's
    time in the step is its trace events' time."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from experiments import profile_train_step

    def program(a, b, c, d):
        return jnp.tanh(a @ b).sum() + jnp.einsum("bij,bjk->bik", c, d).sum()

    rng = np.random.default_rng(0)
    operands = [
        rng.normal(size=shape).astype(np.float32)
        for shape in ((64, 96), (96, 32), (3, 40, 24), (3, 24, 16))
    ]
    compiled = jax.jit(program).lower(*operands).compile()
    dots = profile_train_step.compiled_dots(compiled.as_text())
    found = sorted((dot["lhs"], dot["rhs"], dot["flops"], dot["library"]) for dot in dots.values())
    assert found == [
        ([3, 40, 24], [3, 24, 16], 2 * 3 * 40 * 24 * 16, "YNNPACK"),
        ([64, 96], [96, 32], 2 * 64 * 96 * 32, "YNNPACK"),
    ]
    for dot in dots.values():
        lhs, rhs = (rng.normal(size=dot[side]).astype(np.float32) for side in ("lhs", "rhs"))
        product = lax.dot_general(lhs, rhs, dot["dimension_numbers"])
        expected = np.matmul(lhs, rhs)  # both dots are plain (batched) matrix products
        np.testing.assert_allclose(product, expected, rtol=1e-5, atol=1e-4)

    compiled(*operands).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            compiled(*operands).block_until_ready()
    events = profile_train_step.trace_events(tmp_path)
    matmuls = profile_train_step.matmuls_in_step_and_alone(events, dots, steps=2)
    assert {matmul["operation"] for matmul in matmuls} == set(dots)
    for matmul in matmuls:
        own = [e["dur"] for e in events if e.get("ph") == "X" and e["name"] == matmul["operation"]]
        assert len(own) == 2
        assert matmul["step_ms"] == pytest.approx(sum(own) / 1e3 / 2)
        assert 0 <= matmul["concurrent_ms"] <= matmul["step_ms"]
        assert matmul["alone_ms"] > 0


def test_the_step_profile_tells_xlas_own_dots_from_ynnpacks_and_skips_other_fusions():
    """A compiled program's text, written out: a YNNPACK fusion's dot is named after the
    fusion, a dot outside fusions after itself, and a dot in a loop fusion is left out."""
    from experiments import profile_train_step

    contract = "lhs_contracting_dims={1}, rhs_contracting_dims={0}"
    program = "\n".join(
        [
            "HloModule jit_step",
            "",
            "%fused.7 (p0: f32[8,5], p1: f32[5,3]) -> f32[8,3] {",
            "  %p0 = f32[8,5]{1,0} parameter(0)",
            "  %p1 = f32[5,3]{1,0} parameter(1)",
            f"  ROOT %dot.2 = f32[8,3]{{1,0}} dot(%p0, %p1), {contract}",
            "}",
            "",
            "%fused.9 (p2: f32[8,5]) -> f32[8,8] {",
            "  %p2 = f32[8,5]{1,0} parameter(0)",
            "  ROOT %dot.3 = f32[8,8]{1,0} dot(%p2, %p2), "
            "lhs_contracting_dims={1}, rhs_contracting_dims={1}",
            "}",
            "",
            "ENTRY %main.5 (a: f32[8,5], b: f32[5,3], c: f32[7,8], d: f32[7,2]) -> f32[8,3] {",
            "  %a = f32[8,5]{1,0} parameter(0)",
            "  %b = f32[5,3]{1,0} parameter(1)",
            "  %c = f32[7,8]{1,0} parameter(2)",
            "  %d = f32[7,2]{1,0} parameter(3)",
            "  %ynn_fusion.4 = f32[8,3]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused.7, "
            'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}',
            "  %loop_fusion.1 = f32[8,8]{1,0} fusion(%a), kind=kLoop, calls=%fused.9",
            "  ROOT %dot.8 = f32[8,2]{1,0} dot(%c, %d), "
            "lhs_contracting_dims={0}, rhs_contracting_dims={0}",
            "}",
        ]
    )
    dots = profile_train_step.compiled_dots(program)
    assert dots == {
        "ynn_fusion.4": {
            "library": "YNNPACK",
            "lhs": [8, 5],
            "rhs": [5, 3],
            "dimension_numbers": (([1], [0]), ([], [])),
            "flops": 2 * 8 * 5 * 3,
        },
        "dot.8": {
            "library": "XLA",
            "lhs": [7, 8],
            "rhs": [7, 2],
            "dimension_numbers": (([0], [0]), ([], [])),
            "flops": 2 * 8 * 2 * 7,
        },
    }


def test_the_covered_time_of_an_interval_is_the_union_of_the_others_inside_it():
    from experiments import profile_train_step

    others = [(-5.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.5, 5.8), (9.0, 20.0), (30.0, 40.0)]
    # [0, 3] + [5, 6] + [9, 10], the overlaps counted once
    assert profile_train_step.covered((0.0, 10.0), others) == pytest.approx(5.0)
    assert profile_train_step.covered((0.0, 10.0), []) == 0.0


@pytest.mark.parametrize(("stride", "padding"), [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_every_kernel_gradient_form_timed_is_the_convolutions_kernel_gradient(stride, padding):
    """experiments/kernel_grads' XLA forms against JAX's own gradient of lax's convolution."""
    import jax
    from jax import lax

    from experiments import kernel_grads

    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 6, 6, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    strides = (stride, stride)

    def forward(kernel):
        return lax.conv_general_dilated(
            images, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    outputs, pullback = jax.vjp(forward, kernel)
    assert outputs.shape[1:3] == kernel_grads.output_hw(images.shape, stride)
    output_grad = rng.normal(size=outputs.shape).astype(np.float32)
    (expected,) = pullback(output_grad)
    forms = kernel_grads.xla_kernel_gradients()
    assert list(forms) == list(kernel_grads.XLA_FORMS)
    for form, fn in forms.items():
        got = fn(images, output_grad, strides, padding)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=form)
