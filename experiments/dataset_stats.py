"""Statistics of the embedded datasets: sizes, labels, cardinality and label frequencies.

Writes experiments/results/datasets.md (the table in the README) and datasets.png (the
label-frequency histogram of each training split).

COMMAND:
  python -m experiments.dataset_stats
"""

from pathlib import Path

import matplotlib
import numpy as np
from absl import app

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.suite import CONFIG_FILES
from sdjax import config_lib, datasets

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv):
    del argv
    lines = [
        "| dataset | modality | inputs | train | test | labels | cardinality (train) "
        "| label counts in train: min / median / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, len(CONFIG_FILES), figsize=(4 * len(CONFIG_FILES), 3))
    for ax, (name, config_file) in zip(axes, CONFIG_FILES.items(), strict=True):
        config = config_lib.load_config_file(config_file)
        train, test = datasets.load_train_and_test(config.dataset)
        stats = datasets.label_statistics(train["labels"])
        counts = np.array(stats["label_counts"])
        modality = datasets.DATASETS[name].modality.name
        lines.append(
            f"| {name} | {modality} | {train['inputs'].dtype} {list(train['inputs'].shape[1:])} "
            f"| {stats['samples']} | {len(test['labels'])} | {stats['labels']} "
            f"| {stats['cardinality']:.2f} | {counts.min()} / {int(np.median(counts))} / "
            f"{counts.max()} |"
        )
        ax.bar(np.arange(len(counts)), np.sort(counts)[::-1], width=1.0)
        ax.set(title=name, xlabel="label (by frequency)", ylabel="training examples")
        if counts.max() / max(counts.min(), 1) > 20:
            ax.set_yscale("log")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "datasets.png", dpi=100)
    (RESULTS / "datasets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
