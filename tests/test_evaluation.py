"""The metrics (the long-tail helpers against sklearn and their definitions) and the evaluators
(the registry, the config switches, and their results against the test outputs they save)."""

import numpy as np
import pytest
import sklearn.metrics
from flax import nnx

from sdjax import metrics


def random_problem(seed=0, n=300, c=12):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < np.linspace(0.02, 0.5, c)).astype(np.int64)
    scores = np.clip(0.5 * labels + rng.random((n, c)) * 0.8 - 0.2, 0, 1)
    return scores, labels


def test_per_label_metrics_match_sklearn():
    scores, labels = random_problem()
    labels[:, 0] = 0  # a label without positives
    ap = metrics.per_label_average_precision(scores, labels)
    assert np.isnan(ap[0])
    for j in range(1, labels.shape[1]):
        np.testing.assert_allclose(
            ap[j], sklearn.metrics.average_precision_score(labels[:, j], scores[:, j]), rtol=1e-12
        )
    f1 = metrics.per_label_f1(scores, labels)
    expected = sklearn.metrics.f1_score(labels, scores >= 0.5, average=None, zero_division=0)
    np.testing.assert_allclose(f1, expected, rtol=1e-12)


def test_frequency_groups_are_thirds_by_count():
    counts = np.array([5, 100, 7, 50, 1, 30, 2, 9, 60])
    groups = metrics.frequency_groups(counts)
    assert groups["head"].tolist() == [1, 3, 8]
    assert groups["medium"].tolist() == [2, 5, 7]
    assert sorted(groups["tail"].tolist()) == [0, 4, 6]


def test_bootstrap_point_estimate_and_paired_resamples():
    scores, labels = random_problem(1)
    groups = metrics.frequency_groups(labels.sum(axis=0))
    result = metrics.bootstrap_group_metrics(scores, labels, groups, num_resamples=50)
    head = groups["head"]
    assert len(result["head"]["mAP"]) == 51
    np.testing.assert_allclose(
        result["head"]["mAP"][0],
        sklearn.metrics.average_precision_score(labels[:, head], scores[:, head], average="macro"),
    )
    np.testing.assert_allclose(
        result["tail"]["macro_f1"][0],
        sklearn.metrics.f1_score(
            labels[:, groups["tail"]],
            scores[:, groups["tail"]] >= 0.5,
            average="macro",
            zero_division=0,
        ),
    )
    # Same seed, same resamples: a second call reproduces every replicate.
    again = metrics.bootstrap_group_metrics(scores, labels, groups, num_resamples=50)
    assert again == result
    replicates = np.array(result["head"]["mAP"][1:])
    assert replicates.std() > 0 and abs(replicates.mean() - result["head"]["mAP"][0]) < 0.05


def test_bootstrap_map_replicates_are_the_resampled_rows_map():
    rng = np.random.default_rng(1)
    labels = (rng.random((200, 9)) < np.linspace(0.01, 0.4, 9)).astype(np.int64)
    scores = (0.4 * labels + rng.random((200, 9))).astype(np.float32)  # no ties
    replicates = metrics.bootstrap_mean_average_precision(scores, labels, num_resamples=30)
    assert replicates.shape == (31,)
    # Replicate 0 is the test set itself: the headline mAP, computed by sklearn.
    np.testing.assert_allclose(
        replicates[0], metrics.multilabel_metrics(scores, labels)["mAP"], rtol=1e-12
    )
    # Replicate r: bootstrap_group_metrics's resample r, rows copied and scored as they are.
    for r in range(30):
        rows = np.random.default_rng((0, r)).integers(0, 200, 200)
        expected = np.nanmean(metrics.per_label_average_precision(scores[rows], labels[rows]))
        np.testing.assert_allclose(replicates[1 + r], expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# The evaluators: a registry of modules, switched by config.evals, run on one EvalData
# ---------------------------------------------------------------------------------------------


def test_every_evaluator_module_is_registered_and_switched_in_the_default_config():
    import pkgutil

    from sdjax import config_lib, evaluators

    modules = {m.name for m in pkgutil.iter_modules(evaluators.__path__)} - {"common"}
    assert set(evaluators.EVALUATORS) == modules
    config = config_lib.load_config_file("default")
    assert set(config.evals) == modules  # a switch for each (ConfigDict keeps them sorted)
    assert [name for name, _ in evaluators.from_config(config)] == [
        "heldout_loss",
        "linear_probe",
        "joint_classifier",
        "random_init_probe",
    ]


def test_a_config_stored_before_evals_runs_what_its_linear_eval_switches_ran():
    import ml_collections

    from sdjax import evaluators

    def stored(**linear_eval):
        return ml_collections.ConfigDict({"linear_eval": {"num_steps": 30, **linear_eval}})

    probes = ("heldout_loss", "linear_probe", "joint_classifier")
    assert evaluators.switched_on(stored()) == (*probes, "random_init_probe")
    assert evaluators.switched_on(stored(random_init_baseline=False, save_test_outputs=True)) == (
        *probes,
        "save_test_outputs",
    )


def test_evals_switches_are_checked():
    from sdjax import config_lib, evaluators

    config = config_lib.load_config_file("default", "tiny")
    evaluators.check_config(config)
    with config.unlocked():
        config.evals.linear_prob = True
    with pytest.raises(
        config_lib.ConfigError, match=r"^config\.evals\.linear_prob: no such evaluator"
    ):
        evaluators.check_config(config)
    config = config_lib.load_config_file("default", "tiny")
    with config.ignore_type():
        config.evals.long_tail = "yes"
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.evals\.long_tail: got 'yes', expected True or False\.",
    ):
        evaluators.check_config(config)


class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        for name, value in scalars.items():
            assert name not in self.scalars, name
            self.scalars[name] = (step, value)


@pytest.mark.slow
def test_the_evaluators_results_match_the_test_outputs_they_save(tmp_path):
    """Every evaluator switched on, on an untrained joint Yeast MLP (a classifier of its own) and
    random data with a validation split: each entry is recomputed from test_outputs.npz by the
    metrics alone. (A model without a classifier: the next test.)"""
    from sdjax import config_lib, evaluate, objectives
    from sdjax.sharding import data_parallel_mesh, replicate

    config = config_lib.override(
        config_lib.load_config_file("yeast", "tiny"),
        method="joint",
        **{"evals.save_test_outputs": True, "evals.long_tail": True},
    )
    rng = np.random.default_rng(0)

    def split(n):
        labels = (rng.random((n, 6)) < np.linspace(0.05, 0.6, 6)).astype(np.float32)
        inputs = rng.normal(size=(n, 103)).astype(np.float32) + labels @ rng.normal(size=(6, 103))
        return {"inputs": inputs.astype(np.float32), "labels": labels}

    data = {"train": split(256), "validation": split(96), "test": split(160)}
    mesh = data_parallel_mesh()
    other_seed = config_lib.override(config.copy_and_resolve_references(), seed=1)
    model = objectives.create_model(other_seed, 6)  # not the initial model
    nnx.update(model, replicate(nnx.state(model), mesh))
    writer = RecordingWriter()
    results = evaluate.evaluate(config, model, data, mesh, tmp_path, writer)

    probes = ["linear_eval", "random_init", "classifier"]
    expected_order = ["heldout_stage1_loss", "heldout_split", "validation", "linear_eval"]
    expected_order += ["classifier", "random_init", "long_tail", "stage2_seconds"]
    assert list(results) == expected_order
    assert sorted(results["validation"]) == sorted(probes)
    assert results["heldout_split"] == "validation"
    initial, final = (
        results["heldout_stage1_loss"]["initial"],
        results["heldout_stage1_loss"]["final"],
    )
    assert np.isfinite(initial) and np.isfinite(final) and initial != final  # two models

    saved = np.load(tmp_path / "test_outputs.npz")
    test_labels = data["test"]["labels"]
    np.testing.assert_array_equal(saved["labels"], test_labels)
    assert results["linear_eval"] == metrics.multilabel_metrics(saved["scores"], test_labels)
    # The model's own classifier on the encoder's features, computed here from the model (no
    # dropout in yeast's MLP). float32 sums of 103 and 32 terms, in another order under jit:
    # a relative difference of about 100 x 6e-8.
    features = np.asarray(model.encoder(data["test"]["inputs"]))
    logits = np.asarray(model.classifier(features))
    np.testing.assert_allclose(saved["classifier_scores"], 1 / (1 + np.exp(-logits)), rtol=1e-5)
    assert results["classifier"] == metrics.multilabel_metrics(
        saved["classifier_scores"], test_labels
    )
    groups = metrics.frequency_groups(saved["train_label_counts"])
    assert results["long_tail"] == {
        "train_label_counts": data["train"]["labels"].sum(axis=0).astype(int).tolist(),
        "label_groups": {g: v.tolist() for g, v in groups.items()},
        "group_bootstrap": metrics.bootstrap_group_metrics(saved["scores"], test_labels, groups),
    }
    # Every number of the results went to the writer at the last step, named by its path.
    step = config.num_train_steps
    assert writer.scalars["linear_eval/mAP"] == (step, results["linear_eval"]["mAP"])
    assert writer.scalars["validation/random_init/macro_auc"] == (
        step,
        results["validation"]["random_init"]["macro_auc"],
    )
    assert writer.scalars["heldout_stage1_loss/final"] == (step, final)
    assert not any(name.startswith(("long_tail", "heldout_split")) for name in writer.scalars)


@pytest.mark.slow
def test_no_test_split_no_test_entries_and_no_outputs(tmp_path):
    """eval_split = "validation": the evaluators that need test add nothing and write nothing;
    a model without a classifier of its own gets no "classifier" entry."""
    from sdjax import config_lib, evaluate, objectives
    from sdjax.sharding import data_parallel_mesh, replicate

    config = config_lib.override(
        config_lib.load_config_file("yeast", "tiny"),
        **{
            "evals.save_test_outputs": True,
            "evals.long_tail": True,
            "evals.random_init_probe": False,
        },
    )
    rng = np.random.default_rng(1)
    data = {
        split: {
            "inputs": rng.normal(size=(n, 103)).astype(np.float32),
            "labels": (rng.random((n, 4)) < 0.3).astype(np.float32),
        }
        for split, n in (("train", 128), ("validation", 64))
    }
    mesh = data_parallel_mesh()
    model = objectives.create_model(config, 4)
    nnx.update(model, replicate(nnx.state(model), mesh))
    results = evaluate.evaluate(config, model, data, mesh, tmp_path, RecordingWriter())
    assert list(results) == ["heldout_stage1_loss", "heldout_split", "validation", "stage2_seconds"]
    assert list(results["validation"]) == ["linear_eval"]
    assert list(tmp_path.iterdir()) == []
