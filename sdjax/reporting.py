"""What a run leaves for people to read: results.json and the training-curve figure."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections


def write_results(directory: Path, results: dict) -> None:
    """Writes `results` to `directory/results.json`."""
    (directory / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def plot_training_curve(config: ml_collections.ConfigDict, curve: list[dict], path: Path) -> None:
    """The logged interval-mean loss and the learning rate against the step."""
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = (
        config.method
        if config.method == "bce"
        else f"{config.loss.positives} loss, τ={config.loss.temperature}"
    )
    steps = [entry["step"] for entry in curve]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [entry["train/loss"] for entry in curve])
    ax_loss.set(xlabel="step", ylabel="training loss (interval mean)", title=title)
    ax_lr.plot(steps, [entry["train/learning_rate"] for entry in curve])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
