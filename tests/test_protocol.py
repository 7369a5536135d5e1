"""The tuning protocol (experiments/protocol.py), its statistics and its report, on result files
written here; and two real tiny Yeast runs through the protocol's runner."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import protocol, protocol_report, stats
from experiments.protocol import PROTOCOLS, ProtocolRun
from experiments.suite import code_revision

# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def test_tost_on_a_normal_distribution_matches_its_closed_form():
    # Replicates at the quantiles of N(mu, sigma): each tail's share is the normal cdf there.
    mu, sigma, margin, count = 0.001, 0.002, 0.005, 100_000
    replicates = mu + sigma * scipy_stats.norm.ppf((np.arange(count) + 0.5) / count)
    lower = scipy_stats.norm.cdf((-margin - mu) / sigma)
    upper = scipy_stats.norm.sf((margin - mu) / sigma)
    p = stats.tost_p_value(replicates, margin)
    np.testing.assert_allclose(p, max(lower, upper), atol=3 / count)
    # p < 0.05 exactly when the 90% interval lies inside the margins.
    low, high = stats.percentile_interval(replicates, 0.90)
    assert (p < 0.05) == (-margin < low and high < margin) == True  # noqa: E712
    shifted = replicates + 0.004  # now the upper tail beyond +margin holds ~31%
    expected = scipy_stats.norm.sf((margin - mu - 0.004) / sigma)
    np.testing.assert_allclose(stats.tost_p_value(shifted, margin), expected, atol=3 / count)


def test_bootstrap_p_value_counts_the_smaller_tail():
    replicates = np.array([-1.0, 0.5, 1.0, 2.0, 3.0])  # 1 of 5 at or below 0
    assert stats.bootstrap_p_value(replicates) == pytest.approx(2 * (1 + 1) / 6)
    assert stats.bootstrap_p_value(np.ones(999)) == pytest.approx(2 / 1000)
    assert stats.bootstrap_p_value(np.zeros(9)) == 1.0


def test_two_stage_bootstrap_on_tiny_known_cases():
    resamples = 20_000
    # Seeds only: two seeds whose differences are 0 and 1 on every test resample. A draw of
    # two seeds averages to 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    a = np.array([[0.0] * (1 + resamples), [1.0] * (1 + resamples)])
    replicates = stats.two_stage_bootstrap(a, np.zeros_like(a), seed=3)
    assert set(np.unique(replicates)) == {0.0, 0.5, 1.0}
    shares = [np.mean(replicates == v) for v in (0.0, 0.5, 1.0)]
    tolerance = 4 * np.sqrt(0.25 / resamples)  # 4 binomial standard errors at most
    np.testing.assert_allclose(shares, [0.25, 0.5, 0.25], atol=tolerance)
    # Test examples only: every seed has the same values, so replicate r is resample r's
    # difference exactly, whatever seeds are drawn.
    rng = np.random.default_rng(0)
    row_a, row_b = rng.random(1 + 50), rng.random(1 + 50)
    replicates = stats.two_stage_bootstrap(np.tile(row_a, (3, 1)), np.tile(row_b, (3, 1)))
    np.testing.assert_allclose(replicates, (row_a - row_b)[1:], rtol=1e-12)
    with pytest.raises(ValueError, match=r"a, b: got shapes \(3, 51\) and \(2, 51\)"):
        stats.two_stage_bootstrap(np.tile(row_a, (3, 1)), np.tile(row_b, (2, 1)))


@pytest.mark.parametrize(
    ("effect", "expected"),
    [
        (dict(diff=0.02, low=0.01, high=0.03, p_holm=0.01, tost_p_holm=0.9), "better"),
        (dict(diff=-0.02, low=-0.03, high=-0.01, p_holm=0.01, tost_p_holm=0.9), "worse"),
        # Significant but inside the margin: not claimed; TOST says practically equal.
        (
            dict(diff=0.003, low=0.001, high=0.004, p_holm=0.01, tost_p_holm=0.01),
            "practically equal",
        ),
        # Beyond the margin but the Holm p fails: not claimed.
        (dict(diff=0.02, low=0.001, high=0.04, p_holm=0.09, tost_p_holm=0.9), "inconclusive"),
        (dict(diff=0.001, low=-0.01, high=0.01, p_holm=0.8, tost_p_holm=0.3), "inconclusive"),
    ],
)
def test_verdicts_follow_the_preregistered_rule(effect, expected):
    assert stats.verdict(effect, margin=0.005, alpha=0.05) == expected


# ---------------------------------------------------------------------------------------------
# The protocol's definition
# ---------------------------------------------------------------------------------------------


def test_every_entry_gets_the_same_budget_over_its_own_knobs():
    for name, spec in PROTOCOLS.items():
        for dataset, budget in spec.budgets.items():
            for setting in protocol.settings_of(moco=True):
                for entry in protocol.entries(dataset, setting):
                    configs = protocol.configurations(dataset, setting, entry, budget.num_configs)
                    assert len(configs) == budget.num_configs, (name, dataset, setting, entry)
                    knobs = protocol.search_space(dataset, setting, entry)
                    for config in configs:
                        assert list(config) == [k.field for k in knobs]
                        assert all(config[k.field] in k.values for k in knobs)
                    assert len({tuple(c.values()) for c in configs}) == len(configs)
            assert not set(budget.tuning_seeds) & set(spec.confirmation_seeds)
    assert len(PROTOCOLS["protocol"].confirmation_seeds) >= 10
    fields = {
        (setting, entry): {k.field for k in protocol.search_space("debtags", setting, entry)}
        for setting in ("pretrain", "joint")
        for entry in ("sd", "bce")
    }
    assert fields["pretrain", "sd"] == {
        "optimizer.learning_rate",
        "num_train_steps",
        "loss.temperature",
    }
    assert fields["joint", "sd"] == fields["pretrain", "sd"] | {
        "loss.joint_weight",
        "optimizer.classifier_learning_rate",
    }
    assert fields["pretrain", "bce"] == {
        "optimizer.learning_rate",
        "num_train_steps",
        "optimizer.weight_decay",
        "model.encoder.dropout_rate",
    }
    assert "model.encoder.dropout_rate" not in {
        k.field for k in protocol.search_space("mnist_mosaic", "pretrain", "bce")
    }  # a ResNet has no dropout
    assert {k.field for k in protocol.search_space("debtags", "reference", "tfidf")} == {
        "inverse_regularization",
        "max_ngram",
    }
    # Deterministic, and a smaller budget tries a prefix of a larger one's configurations.
    assert protocol.configurations("yeast", "joint", "any", 5)[:2] == (
        protocol.configurations("yeast", "joint", "any", 2)
    )


def test_knob_values_resolve_against_the_config_file():
    from sdjax import config_lib

    base = config_lib.load_config_file("debtags")
    knobs = {
        "optimizer.learning_rate": 3.0,
        "num_train_steps": 1.5,
        "loss.temperature": 0.05,
        "loss.joint_weight": 0.1,
        "optimizer.classifier_learning_rate": 10.0,
    }
    overrides = protocol.config_overrides("debtags", "joint", "any", knobs, base)
    assert overrides == {
        "method": "joint",
        "loss.positives": "any",
        "optimizer.learning_rate": pytest.approx(3 * base.optimizer.learning_rate),
        "num_train_steps": round(1.5 * base.num_train_steps),
        "loss.temperature": 0.05,
        "loss.joint_weight": pytest.approx(0.1 * base.loss.joint_weight),
        # A multiple of the learning rate this configuration trains with, not the file's.
        "optimizer.classifier_learning_rate": pytest.approx(30 * base.optimizer.learning_rate),
    }
    bce = protocol.config_overrides("debtags", "joint", "bce", {}, base)
    assert bce == {"method": "joint", "loss.joint_weight": 0.0}


# ---------------------------------------------------------------------------------------------
# Plan, selection, ledger and report on fake result files
# ---------------------------------------------------------------------------------------------

TEST_PROFILE = "protocol_test"
RESAMPLES = 1000


@pytest.fixture
def test_profile(monkeypatch):
    spec = protocol.Protocol(
        config_profile="",
        budgets={
            "debtags": protocol.Budget(num_configs=2, tuning_seeds=(1000,)),
            "yeast": protocol.Budget(num_configs=2, tuning_seeds=(1000,)),
        },
        confirmation_seeds=(0, 1, 2),
        bootstrap_resamples=RESAMPLES,
        description="a test profile",
    )
    monkeypatch.setitem(PROTOCOLS, TEST_PROFILE, spec)
    return spec


def fake_record(run: ProtocolRun, validation: float, test_rows=None, probe=None):
    scorer = run.scorer
    record = {
        "name": run.name,
        "run": dataclasses.asdict(run),
        "knobs": {"optimizer.learning_rate": 1.0},
        "overrides": {},
        "scored_by": scorer,
        "validation_mAP": validation,
        "validation": {scorer: {"mAP": validation}},
        "wall_seconds": 1.0,
        "hardware": "cpu, 2 cores",
    }
    if scorer == "classifier":
        record["validation"]["linear_eval"] = {"mAP": validation if probe is None else probe}
    if test_rows is not None:
        record["test_bootstrap_mAP"] = list(test_rows)
        record["test_mAP"] = test_rows[0]
        record["test"] = {scorer: {m: test_rows[0] for m in protocol_report.METRICS}}
    return record


def write(results_dir, record):
    run = ProtocolRun(**record["run"])
    path = protocol.result_path(results_dir, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    protocol.append_to_ledger(results_dir, record)


def validation_score(config_id):
    """Config 1 is the better one on validation for every entry."""
    return 0.3 + 0.1 * config_id


def test_selection_reads_validation_only_and_confirmation_follows_it(tmp_path, test_profile):
    runs, waiting = protocol.plan(TEST_PROFILE, tmp_path)
    assert {r.stage for r in runs} == {"tuning"} and len(waiting) == 2 * (7 + 7) + 1
    for run in runs:
        write(tmp_path, fake_record(run, validation_score(run.config_id)))
    runs, waiting = protocol.plan(TEST_PROFILE, tmp_path)
    assert not waiting
    confirmation = [r for r in runs if r.stage == "confirmation"]
    assert {r.config_id for r in confirmation} == {1}
    assert len(confirmation) == 2 * 2 * 7 * 3 + 1  # the TF-IDF reference: one run
    assert {r.seed for r in confirmation} == {0, 1, 2}
    # A record that holds test metrics cannot take part in selection.
    tuning = [protocol.load_result(tmp_path, r) for r in runs if r.stage == "tuning"]
    with pytest.raises(ValueError, match="selection reads tuning records"):
        protocol.select([*tuning[:3], {**tuning[3], "test": {"linear_eval": {"mAP": 1.0}}}])
    with pytest.raises(ValueError, match="datasets: got"):
        protocol.plan(TEST_PROFILE, tmp_path, ["imagenet"])


def test_report_states_the_preregistered_comparison(tmp_path, test_profile):
    rng = np.random.default_rng(0)
    runs, _ = protocol.plan(TEST_PROFILE, tmp_path)
    for run in runs:
        write(tmp_path, fake_record(run, validation_score(run.config_id)))
    noise = 0.0005 * rng.standard_normal((3, RESAMPLES))  # test-resample noise of S-D
    base = {"sd": 0.50, "all": 0.40, "any": 0.501, "jaccard": 0.496}
    runs, _ = protocol.plan(TEST_PROFILE, tmp_path)
    test_values = {}
    for run in runs:
        if run.stage != "confirmation":
            continue
        value = base.get(run.entry, 0.45) + 0.001 * run.seed
        rows = np.concatenate([[value], value + noise[run.seed]])
        if run.entry == "jaccard":  # far noisier: neither a difference nor equivalence
            rows[1:] += 0.01 * rng.standard_normal(RESAMPLES)
        test_values[run] = rows
        # The `any` joint classifier sits below the probe on its own encoder.
        probe = 0.9 if (run.setting, run.entry) == ("joint", "any") else None
        write(tmp_path, fake_record(run, 0.5, rows, probe))
    ledger_lines = len((tmp_path / "ledger.jsonl").read_text().splitlines())
    # A configuration tried outside the plan stays in the ledger and is counted.
    stray = ProtocolRun("debtags", "pretrain", "sd", 7, 1000, "tuning")
    protocol.append_to_ledger(tmp_path, fake_record(stray, 0.99))
    body = protocol_report.write_report(TEST_PROFILE, tmp_path)
    text = "\n".join(body)
    assert f"has {ledger_lines + 1} lines" in text
    assert "Planned runs without a matching line: 0. Runs outside the plan: 1 (" in text
    assert stray.name in text
    assert "Below its probe: debtags any, yeast any." in text

    def row(setting, rival):
        section = text.split("### Primary comparison")[1].split("### Exploratory")[0]
        return next(x for x in section.splitlines() if x.startswith(f"| {setting} | {rival} |"))

    for rival, reading in (
        ("all", "**S-D better**"),
        ("any", "practically equal"),
        ("jaccard", "inconclusive"),
    ):
        cells = row("pretrain", rival).strip("| ").split(" | ")

        def mean_test(entry):
            return np.mean(
                [
                    rows[0]
                    for r, rows in test_values.items()
                    if (r.dataset, r.setting, r.entry) == ("debtags", "pretrain", entry)
                ]
            )

        expected_diff = mean_test("sd") - mean_test(rival)
        assert cells[4] == f"{expected_diff:+.4f}", rival
        assert cells[-1] == reading, rival
    # The constant difference to `all`: every replicate is 0.1, so is its interval, and its
    # p is the smallest the bootstrap gives, times Holm's 14.
    assert "| [+0.1000, +0.1000] |" in row("pretrain", "all")
    assert f"| {min(1.0, 14 * 2 / (RESAMPLES + 1)):.3f} |" in row("pretrain", "all")
    assert "family of 14 contrasts" in text and "tfidf" in row("joint", "tfidf")
    assert "**yeast: S-D against each entry** (exploratory" in text
    assert (tmp_path / "report.md").read_text().count("(../../protocol.py)") == 1
    # Under the table, each setting's readings are summed up in one line that matches it.
    primary = text.split("### Primary comparison")[1].split("### Exploratory")[0]
    readings = {}
    for line in primary.splitlines():
        cells = line.strip("| ").split(" | ")
        if line.startswith("| pretrain |"):
            readings.setdefault(cells[-1].strip("*").removeprefix("S-D "), []).append(cells[1])
    assert "practically equal" in readings and "inconclusive" in readings
    phrases = {
        "better": "better than",
        "worse": "worse than",
        "practically equal": "practically equal to",
        "inconclusive": "inconclusive against",
    }
    expected = "; ".join(
        f"{phrases[r]} " + ", ".join(f"`{rival}`" for rival in readings[r])
        for r in phrases
        if r in readings
    )
    assert f"- `pretrain`: S-D {expected}." in primary.splitlines()
    # A tuning record that holds test metrics stops the report: selection never sees test.
    tuning_run = next(r for r in runs if r.stage == "tuning")
    tainted = {**protocol.load_result(tmp_path, tuning_run), "test": {"linear_eval": {}}}
    protocol.result_path(tmp_path, tuning_run).write_text(json.dumps(tainted))
    with pytest.raises(ValueError, match="selection reads tuning records"):
        protocol_report.write_report(TEST_PROFILE, tmp_path)
    del tainted["test"]
    protocol.result_path(tmp_path, tuning_run).write_text(json.dumps(tainted))
    # Incomplete results give no report.
    protocol.result_path(tmp_path, next(iter(test_values))).unlink()
    with pytest.raises(ValueError, match="is incomplete: 1 runs missing"):
        protocol_report.write_report(TEST_PROFILE, tmp_path)


@pytest.mark.slow
def test_dry_run_lists_both_profiles_with_their_hours(tmp_path):
    for profile in ("protocol", "protocol_quick"):
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.run_experiments",
                f"--profile={profile}",
                "--dry_run",
                f"--results_dir={tmp_path}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
            cwd=Path(protocol.__file__).parents[1],
        ).stdout
        tuning = [line for line in listing.splitlines() if line.startswith("to do  tuning/")]
        spec = PROTOCOLS[profile]
        expected = sum(
            spec.budgets[d].num_configs * (1 if e == "tfidf" else len(spec.budgets[d].tuning_seeds))
            for d, s, e in protocol.cells(profile)
        )
        assert len(tuning) == expected
        assert "h left on the 2-core CPU" in listing.splitlines()[1]
        assert "later  confirmation/debtags/pretrain/sd/<selected>" in listing


def test_the_default_report_leaves_out_a_protocol_profile_still_running(tmp_path):
    """`experiment_report` without --profiles skips an incomplete protocol profile and says so;
    named explicitly, the same profile is refused."""
    (tmp_path / "protocol_quick" / "runs").mkdir(parents=True)
    planned = len(
        protocol_report.missing_runs("protocol_quick", tmp_path / "protocol_quick", False)
    )
    root = Path(protocol.__file__).parents[1]

    def report(*flags):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.experiment_report",
                f"--results_dir={tmp_path}",
                *flags,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=root,
        )

    default = report()
    assert default.returncode == 1
    assert f"left out: protocol_quick, {planned} runs still missing" in default.stdout
    assert "No complete profile has result files" in default.stderr
    named = report("--profiles=protocol_quick")
    assert (
        named.returncode == 1 and "profile in" in named.stderr and "is incomplete" in named.stderr
    )
    assert not (tmp_path / "protocol_quick" / "report.md").exists()


# ---------------------------------------------------------------------------------------------
# Two real runs: a tuning run never loads test; a confirmation run keeps float32 test scores
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_protocol_runs_train_score_and_record(tmp_path, monkeypatch):
    from experiments import run_experiments
    from sdjax import datasets, metrics
    from sdjax.datasets import registry

    loaded = []

    real_load_split = datasets.load_split

    def recording_load_split(name, split, **kwargs):
        loaded.append(split)
        return real_load_split(name, split, **kwargs)

    monkeypatch.setattr(registry, "load_split", recording_load_split)
    results_dir = tmp_path / "results"
    tuning = ProtocolRun("yeast", "joint", "sd", 0, 1000, "tuning")
    record = run_experiments.execute_protocol_run(
        "protocol_smoke", tuning, results_dir, tmp_path / "work", str(tmp_path / "data")
    )
    assert "test" not in loaded and "test" not in record and "linear_eval" not in record
    assert record["validation_mAP"] == record["validation"]["classifier"]["mAP"]
    assert record["heldout_split"] == "validation"
    assert record["overrides"]["method"] == "joint"
    loaded.clear()
    confirmation = dataclasses.replace(tuning, seed=0, stage="confirmation")
    record = run_experiments.execute_protocol_run(
        "protocol_smoke", confirmation, results_dir, tmp_path / "work", str(tmp_path / "data")
    )
    assert sorted(loaded) == ["test", "train_without_validation", "validation"]
    saved = np.load(results_dir / "test_scores" / f"{confirmation.name}.npz")
    assert saved["scores"].dtype == np.float32 and saved["labels"].shape == (917, 14)
    np.testing.assert_allclose(
        metrics.multilabel_metrics(saved["scores"], saved["labels"])["mAP"],
        record["test"]["classifier"]["mAP"],
        rtol=1e-12,
    )
    replicates = record["test_bootstrap_mAP"]
    assert len(replicates) == 1 + PROTOCOLS["protocol_smoke"].bootstrap_resamples
    np.testing.assert_allclose(replicates[0], record["test_mAP"], rtol=1e-9)
    ledger = protocol.read_ledger(results_dir)
    assert [row["run"] for row in ledger] == [tuning.name, confirmation.name]
    assert not (tmp_path / "work" / "protocol_smoke" / confirmation.name).exists()


def test_the_text_reference_runs_on_the_same_splits(tmp_path, monkeypatch):
    from experiments import run_experiments
    from sdjax import metrics
    from sdjax.datasets import debtags

    rng = np.random.default_rng(0)
    words = ["editor", "pictures", "window", "puzzle"]

    def split_of(size):
        labels = (rng.random((size, 4)) < 0.4).astype(np.float32)
        texts = [
            " ".join([w for w, on in zip(words, row, strict=True) if on] + ["tool", f"n{i}"])
            for i, row in enumerate(labels)
        ]
        return texts, labels

    corpus = {"train_without_validation": split_of(120), "validation": split_of(40)}
    corpus["test"] = split_of(50)
    asked = []

    def fake_corpus(data_dir, source_dir, splits):
        asked.append(list(splits))
        return {s: corpus[s] for s in splits}, ["a", "b", "c", "d"]

    monkeypatch.setattr(debtags, "corpus", fake_corpus)
    results_dir = tmp_path / "results"
    run = ProtocolRun("debtags", "reference", "tfidf", 1, 1000, "tuning")
    knobs = protocol.configurations("debtags", "reference", "tfidf", 2)[1]
    digest = "5d" * 32
    record = run_experiments.execute_protocol_run(
        "protocol_quick", run, results_dir, tmp_path, "", digest
    )
    assert asked == [["train_without_validation", "validation"]] and "test" not in record
    assert record["data_sha256"] == digest
    assert record["code_revision"] == code_revision()
    record_validation_mAP = record["validation_mAP"]
    assert record["knobs"] == knobs and record["scored_by"] == "tfidf"
    assert record["validation_mAP"] > 0.9  # each tag has its telling word
    confirmation = dataclasses.replace(run, seed=0, stage="confirmation")
    record = run_experiments.execute_protocol_run(
        "protocol_quick", confirmation, results_dir, tmp_path, ""
    )
    saved = np.load(results_dir / "test_scores" / f"{confirmation.name}.npz")
    assert saved["scores"].dtype == np.float32 and saved["scores"].shape == (50, 4)
    np.testing.assert_array_equal(saved["labels"], corpus["test"][1])
    np.testing.assert_allclose(
        record["test"]["tfidf"]["mAP"],
        metrics.multilabel_metrics(saved["scores"], corpus["test"][1])["mAP"],
        rtol=1e-12,
    )
    assert len(record["test_bootstrap_mAP"]) == 1001
    ledger = protocol.read_ledger(results_dir)
    assert [row["run"] for row in ledger] == [run.name, confirmation.name]
    assert [row.get("data_sha256") for row in ledger] == [digest, None]
    assert [row["code_revision"] for row in ledger] == [code_revision()] * 2
    # Run again: the same scores (TF-IDF is deterministic), kept beside the ledger, not in it.
    scores_file = results_dir / "test_scores" / f"{confirmation.name}.npz"
    scores_written = scores_file.stat().st_mtime_ns
    reruns = run_experiments.rerun_protocol_runs(
        "protocol_quick", [run.name, confirmation.name], results_dir, tmp_path, ""
    )
    lines = protocol.read_lines(results_dir / protocol.RERUNS)
    assert [{k: v for k, v in line.items() if k != "finished"} for line in lines] == reruns
    assert [rerun["run"] for rerun in reruns] == [run.name, confirmation.name]
    assert reruns[0]["validation_mAP"] == [record_validation_mAP] * 2
    assert reruns[1]["test_mAP"] == [record["test_mAP"]] * 2
    assert reruns[1]["hardware"] == [record["hardware"]] * 2 and "final_train_loss" not in reruns[1]
    assert reruns[1]["code_revision"] == [code_revision()] * 2
    assert len(protocol.read_ledger(results_dir)) == 2
    assert scores_file.stat().st_mtime_ns == scores_written
    with pytest.raises(
        ValueError, match=r"`--rerun`: got 'nope', expected a run in protocol_quick"
    ):
        run_experiments.rerun_protocol_runs(
            "protocol_quick", [run.name, "nope"], results_dir, tmp_path, ""
        )
    assert len(protocol.read_lines(results_dir / protocol.RERUNS)) == 2  # nothing ran


def test_the_ledger_refuses_runs_on_other_data():
    ledger = [
        {"run": "tuning/debtags/pretrain/sd/c0_s1000", "dataset": "debtags"},  # before digests
        {
            "run": "tuning/debtags/pretrain/sd/c1_s1000",
            "dataset": "debtags",
            "data_sha256": "a" * 64,
        },
        {"run": "tuning/yeast/pretrain/sd/c0_s1000", "dataset": "yeast"},
    ]
    protocol.check_data(ledger, "debtags", "a" * 64)
    protocol.check_data(ledger, "yeast", None)
    protocol.check_data(ledger, "yeast", "b" * 64)
    with pytest.raises(
        ValueError,
        match=r"^debtags: the data prepared here has SHA-256 bbbbbbbbbbbbbbbb\.\.\., expected "
        r"aaaaaaaaaaaaaaaa\.\.\., the data that tuning/debtags/pretrain/sd/c1_s1000 in the ledger",
    ):
        protocol.check_data(ledger, "debtags", "b" * 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"eval_split": "validation"},
            "config.eval_split: got 'validation', expected \"test\" unless dataset.validation",
        ),
        ({"eval_split": "train"}, "config.eval_split: got 'train', expected one of"),
        (
            {"optimizer.classifier_learning_rate": -1.0},
            "config.optimizer.classifier_learning_rate: got -1.0, expected a finite number >= 0",
        ),
    ],
)
def test_the_validation_fields_are_checked(overrides, message):
    import re

    from sdjax import config_lib

    config = config_lib.override(config_lib.load_config_file("yeast", "tiny"), **overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(config, num_devices=1, num_processes=1)
    config_lib.override(config, **{"dataset.validation": True, "eval_split": "validation"})
    if "eval_split" in overrides and overrides["eval_split"] == "validation":
        config_lib.check_config(config, num_devices=1, num_processes=1)  # now consistent


def test_a_run_stored_before_the_validation_fields_resumes_unchanged():
    from sdjax import config_lib

    config = config_lib.load_config_file("yeast", "tiny")
    current = config_lib.flat_fields(config)
    older = {
        k: v
        for k, v in current.items()
        if k not in ("dataset.validation", "eval_split", "optimizer.classifier_learning_rate")
    }
    assert config_lib.result_changing_differences(older, current) == []
    config_lib.override(config, **{"dataset.validation": True})
    assert config_lib.result_changing_differences(older, config_lib.flat_fields(config)) == [
        "dataset.validation: False -> True"
    ]


def test_reruns_are_reported_with_where_each_ran():
    from experiments import protocol_report

    reruns = [
        {
            "run": "tuning/x",
            "hardware": ["cpu (A)", "cpu (B)"],
            "validation_mAP": [0.4047494, 0.4055701],
        },
        {
            "run": "confirmation/y",
            "hardware": ["cpu (B)", "cpu (B)"],
            "validation_mAP": [0.5, 0.5],
            "test_mAP": [0.45, 0.45],
        },
    ]
    lines = protocol_report.reruns_section(reruns)
    assert lines[4:] == [
        "| `tuning/x` | cpu (A) | cpu (B) | 0.4047 → 0.4056 |  |",
        "| `confirmation/y` | cpu (B) | cpu (B) | 0.5000 → 0.5000 (bit for bit) "
        "| 0.4500 → 0.4500 (bit for bit) |",
        "",
    ]
    assert protocol_report.reruns_section([]) == []


def test_runs_record_the_commit_of_the_code_that_made_them(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    assert code_revision(tmp_path) == "unknown"  # not a git checkout
    for path in ("sdjax/loss.py", "experiments/results/run.json", "experiments/README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    commit = git("rev-parse", "HEAD")
    assert len(commit) == 40 and code_revision(tmp_path) == commit
    # Results written while runs train, and prose, leave the code as committed.
    (tmp_path / "experiments/results/run.json").write_text("1\n")
    (tmp_path / "experiments/results/new.json").write_text("1\n")
    (tmp_path / "experiments/README.md").write_text("1\n")
    assert code_revision(tmp_path) == commit
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/new.py").write_text("1\n")  # a new, uncommitted config
    assert code_revision(tmp_path) == commit + "+modified"
    (tmp_path / "configs/new.py").unlink()
    (tmp_path / "sdjax/loss.py").write_text("1\n")
    assert code_revision(tmp_path) == commit + "+modified"


def test_the_report_says_which_code_made_the_runs():
    from experiments import protocol_report

    revision = "0123456789abcdef" * 2 + "01234567"
    records = [
        {"code_revision": revision},
        {"code_revision": revision},
        {"code_revision": revision + "+modified"},
        {},
    ]
    assert protocol_report.code_sentence(records) == (
        "Code (git commit: runs): `0123456789ab` (2); `0123456789ab+modified` (1); "
        "not recorded (1: runs before the commit was kept)."
    )


# Profiles whose committed results are complete: their report and README block are what the
# report code writes from those results now, byte for byte.
COMMITTED_REPORTS = ("protocol_quick", "protocol")


@pytest.mark.parametrize("profile", COMMITTED_REPORTS)
def test_committed_reports_regenerate_byte_for_byte(tmp_path, profile):
    import shutil

    experiments_dir = Path(__file__).resolve().parents[1] / "experiments"
    committed = experiments_dir / "results" / profile
    results_dir = tmp_path / profile
    shutil.copytree(committed, results_dir, ignore=shutil.ignore_patterns("test_scores"))
    readme = tmp_path / "README.md"
    shutil.copy(experiments_dir / "README.md", readme)
    protocol_report.write_report(profile, results_dir, readme)
    assert (results_dir / "report.md").read_text() == (committed / "report.md").read_text()
    assert readme.read_text() == (experiments_dir / "README.md").read_text()
