"""Entry point: `python -m sdjax.main --config configs/default.py --workdir DIR`.

Any config field can be overridden on the command line, e.g. `--config.loss.positives=any`, and
every config file takes a profile, e.g. `--config configs/yeast.py:tiny`. Rerunning the same
command resumes from the newest checkpoint in DIR/checkpoints that restores.

Exit codes: 0 done (or stopped by SIGTERM after saving), 1 the run failed (non-finite training),
2 a bad config or a workdir in use, 3 a multi-host peer that never arrived.
"""

import json
import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import checkpointing, config_lib, input_pipeline, multihost, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])

SHOWN_RESULTS = ("linear_eval", "random_init", "classifier", "validation")  # "classifier": joint


def summary(results: dict, workdir: str) -> str:
    lines = [f"Results in {workdir}/results.json:"]
    for name in SHOWN_RESULTS:
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad config file, profile or field is one line, not a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        if "ConfigError: " in str(error):  # raised inside the config file, e.g. a bad profile
            print(f"Bad config: {str(error).split('ConfigError: ')[-1]}", file=sys.stderr)
        else:
            print(f"{error}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        message = " ".join(str(error).replace("\\n", " ").replace("\\'", "").split())
        if "Did you mean" in message:  # ml_collections' suggestion for a misspelt field
            message = "no such field. " + message[message.index("Did you mean") :]
        overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        culprit = next((arg for arg in overrides if arg.split(".")[-1] in message), "--config")
        print(f"Bad config: {culprit}: {message.strip(chr(39))}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = FLAGS.config
    try:
        multihost.initialize(config)
        config_lib.check_config(
            config, num_devices=jax.device_count(), num_processes=jax.process_count()
        )
    except config_lib.ConfigError as error:
        print(f"Bad config: {error}", file=sys.stderr)
        return 2
    logging.info("Config:\n%s", config)
    try:
        results = train.train_and_evaluate(config, FLAGS.workdir)
    except (
        config_lib.ConfigError,
        checkpointing.WorkdirInUse,
        input_pipeline.MissingExtra,
    ) as error:
        print(f"Cannot run: {error}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as error:
        print(f"Training failed: {error}", file=sys.stderr)
        return 1
    except train.Preempted as stop:
        logging.warning("%s", stop)
        print(stop, flush=True)
        return 0
    if jax.process_index() == 0:
        print(json.dumps({k: results[k] for k in SHOWN_RESULTS if k in results}))
        print(summary(results, FLAGS.workdir), flush=True)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
