"""Entry point: `python -m sdjax.main --config configs/default.py --workdir DIR`.

Any config field can be overridden on the command line, e.g. `--config.loss.positives=any`, and
every config file takes a profile, e.g. `--config configs/yeast.py:tiny`. Rerunning the same
command resumes from the newest checkpoint in DIR/checkpoints that restores.

Every failure a user can meet ends in one line on stderr, and the exit status says which kind:

  0  done, or stopped by SIGTERM after saving a checkpoint (rerun to resume).
  1  the run failed while training: non-finite training (the message says what to change, in
     a new workdir), or checkpoints that could not be written (rerun to resume).
  2  the run could not start, and nothing was trained: a bad config or command line
     ("Bad config: ..."), or a workdir in use or not writable, a workdir holding another
     config's run, or a dataset's missing source files ("Cannot run: ...").
  3  a multi-host peer never arrived within multihost.initialization_timeout_s.
"""

import json
import shlex
import sys
from pathlib import Path

import jax
import ml_collections
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
            metrics = ", ".join(_metric(k, v) for k, v in results[name].items())
            lines.append(f"  {name}: {metrics}")
    lines.append(f"TensorBoard logs: {workdir} (tensorboard --logdir {shlex.quote(workdir)})")
    lines.append(
        f"Checkpoints: {workdir}/checkpoints; training curves: {workdir}/training_curves.png"
    )
    return "\n".join(lines)


def _metric(name: str, value: float) -> str:
    return f"{name}={int(value)}" if name.startswith("num_") else f"{name}={value:.4f}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad config file, profile or field is one line, not a traceback."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.is_locked  # noqa: B018 (a config file that failed to load raises when read)
        return remaining
    except flags.Error as error:
        if "ConfigError: " in str(error):  # raised inside the config file, e.g. a bad profile
            print(f"Bad config: {str(error).split('ConfigError: ')[-1]}", file=sys.stderr)
        else:
            print(f"{error}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    except OSError as error:  # ml_collections' "Configuration is not available ...", chained
        path = _config_argument(argv)
        if not _config_file_exists(path):
            print(f"Bad config: --config: got {path!r}, no such config file.", file=sys.stderr)
        else:  # its last line is the config file's own error
            detail = str(error).strip().splitlines()[-1].strip()
            print(f"Bad config: --config: {path!r} does not load: {detail}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        message = " ".join(str(error).replace("\\n", " ").replace("\\'", "").split())
        overrides = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
        culprit = next((arg for arg in overrides if arg.split(".")[-1] in message), "--config")
        if "Did you mean" in message:  # ml_collections' suggestion for a misspelt field
            message = "no such field. " + message[message.index("Did you mean") :]
        elif isinstance(error, (AttributeError, KeyError)):  # no field of a name near it
            message = "no such field."
        print(f"Bad config: {culprit}: {message.strip(chr(39))}", file=sys.stderr)
    sys.exit(2)


def _config_argument(argv: list[str]) -> str:
    """The last `--config=PATH` or `--config PATH` of the command line."""
    values = [
        arg.split("=", 1)[1] if "=" in arg else argv[i + 1]
        for i, arg in enumerate(argv)
        if (arg.startswith("--config=") or arg == "--config") and i + ("=" not in arg) < len(argv)
    ]
    return values[-1] if values else ""


def _config_file_exists(path: str) -> bool:
    return Path(path.rsplit(":", 1)[0] if ":" in path else path).is_file()


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains (or resumes) in `workdir` and prints the results; returns the exit status.

    Every failure that a user can meet is one line on stderr (see the module docstring).
    """
    try:
        multihost.initialize(config)
    except config_lib.ConfigError as error:
        print(f"Bad config: {config_lib.one_line(error)}", file=sys.stderr)
        return 2
    logging.info("Config:\n%s", config)
    try:
        results = train.train_and_evaluate(config, workdir)  # checks the config first
    except (
        checkpointing.WorkdirHoldsAnotherRun,
        checkpointing.WorkdirUnusable,
        input_pipeline.DataUnavailable,
        input_pipeline.MissingExtra,
    ) as error:
        print(f"Cannot run: {config_lib.one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except config_lib.ConfigError as error:  # the config's own checks, or the data's
        print(f"Bad config: {config_lib.one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except (train.NonFiniteLoss, train.CheckpointWriteFailed) as error:
        print(f"Training failed: {config_lib.one_line(error)}", file=sys.stderr, flush=True)
        return 1
    except train.Preempted as stop:
        logging.warning("%s", stop)
        print(stop, flush=True)
        return 0
    if jax.process_index() == 0:
        print(json.dumps({k: results[k] for k in SHOWN_RESULTS if k in results}))
        print(summary(results, workdir), flush=True)
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpointing.quiet_orbax_logs()
    return run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
