"""Entry point: `python -m sdjax.main --config configs/default.py --workdir DIR`.

Any config field can be overridden on the command line, e.g. `--config.loss.positives=any`.
Rerunning the same command resumes from the latest checkpoint in DIR/checkpoints.
"""

import json
import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def summary(results: dict, workdir: str) -> str:
    lines = [f"Results in {workdir}/results.json:"]
    for name in ("linear_eval", "random_init"):
        if name in results:
            metrics = ", ".join(f"{k}={v:.4f}" for k, v in results[name].items())
            lines.append(f"  {name}: {metrics}")
    lines.append(f"TensorBoard logs: {workdir} (tensorboard --logdir {workdir})")
    lines.append(
        f"Checkpoints: {workdir}/checkpoints; training curves: {workdir}/training_curves.png"
    )
    return "\n".join(lines)


class _QuietLibraries(pylogging.Filter):
    """Drops orbax's per-save INFO chatter so the progress lines stay readable."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = FLAGS.config
    if config.distributed:
        jax.distributed.initialize()
    try:
        train.check_config(config)
    except ValueError as error:
        print(f"Bad config: {error}", file=sys.stderr)
        return 2
    logging.info("Config:\n%s", config)
    try:
        results = train.train_and_evaluate(config, FLAGS.workdir)
    except train.Preempted as stop:
        logging.warning("%s", stop)
        print(stop, flush=True)
        return 0
    if jax.process_index() == 0:
        print(json.dumps({k: results[k] for k in ("linear_eval", "random_init") if k in results}))
        print(summary(results, FLAGS.workdir), flush=True)
    return 0


if __name__ == "__main__":
    app.run(main)
