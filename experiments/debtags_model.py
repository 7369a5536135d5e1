"""The best debtags model against the TF-IDF reference, over seeds.

Trains `configs/debtags_joint.py` (bag of embeddings, S-D + BCE) once per seed and scores each
run twice on the test split: a linear probe on the frozen encoder and the jointly trained
classifier. Writes `results/debtags_joint.json`: every seed's metrics, and the mean mAP with its
95% t-interval and a one-sample t-test against the TF-IDF reference's mAP, read from
`results/debtags_reference.json` (`python -m experiments.text_reference`). A seed whose workdir
holds a finished run is evaluated again from its checkpoint, not retrained. About 3 minutes a
seed on the 2-core CPU.

COMMAND:
  python -m experiments.debtags_model            # seeds 0-4
  python -m experiments.debtags_model --seeds=0  # one seed
"""

from __future__ import annotations

# The restart comes before the imports, which it would otherwise run twice.
from sdjax import host_memory

if __name__ == "__main__":
    host_memory.restart_with_huge_pages()

import datetime
import json
from pathlib import Path

import numpy as np
from absl import app, flags, logging

from experiments.suite import hardware_name

EXPERIMENTS = Path(__file__).resolve().parent
RESULTS = EXPERIMENTS / "results"
CONFIG = "debtags_joint"

FLAGS = flags.FLAGS


def against_reference(values, reference: float) -> dict:
    """Mean over seeds, its 95% t-interval and the two-sided p of mean = reference."""
    from scipy import stats

    values = np.asarray(values, np.float64)
    summary = {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}
    if len(values) > 1:
        test = stats.ttest_1samp(values, popmean=reference)
        interval = test.confidence_interval(0.95)
        summary.update(interval_95=[interval.low, interval.high], p_vs_reference=test.pvalue)
    return summary


def main(argv):
    del argv
    from sdjax import config_lib, train

    reference = json.loads((RESULTS / "debtags_reference.json").read_text())["test"]["mAP"]
    runs = {}
    for seed in map(int, FLAGS.seeds):
        config = config_lib.override(
            config_lib.load_config_file(CONFIG),
            seed=seed,
            **{"dataset.data_dir": FLAGS.data_dir, "evals.random_init_probe": False},
        )
        results = train.train_and_evaluate(config, Path(FLAGS.workdir) / f"seed_{seed}")
        runs[seed] = {key: results[key] for key in ("linear_eval", "classifier", "stage1_seconds")}
        logging.info(
            "seed %d: probe mAP %.4f, classifier mAP %.4f (reference %.4f)",
            seed,
            results["linear_eval"]["mAP"],
            results["classifier"]["mAP"],
            reference,
        )
    record = {
        "command": f"python -m experiments.debtags_model --seeds={','.join(FLAGS.seeds)}",
        "config": f"configs/{CONFIG}.py",
        "hardware": hardware_name(),
        "date": datetime.date.today().isoformat(),
        "reference_mAP": reference,
        "mAP": {
            scorer: against_reference([run[scorer]["mAP"] for run in runs.values()], reference)
            for scorer in ("linear_eval", "classifier")
        },
        "seeds": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{CONFIG}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["mAP"], indent=1), f"reference {reference:.4f}")


def define_flags():
    """Here, not at import: the tests import this module beside run_experiments, same flags."""
    flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Training seeds.")
    flags.DEFINE_string(
        "workdir", str(EXPERIMENTS / "workdirs" / CONFIG), "Seed i trains in <workdir>/seed_i."
    )
    flags.DEFINE_string("data_dir", "", "tfds data dir; '' = $TFDS_DATA_DIR or the sdjax cache.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
