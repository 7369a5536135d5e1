"""Entry point: `python -m sdjax.main --config configs/default.py --workdir DIR`.

Any config field can be overridden on the command line, e.g. `--config.loss.positives=any`, and
every config file takes a profile, e.g. `--config configs/yeast.py:tiny`. Rerunning the same
command resumes from the newest checkpoint in DIR/checkpoints that restores.

Every failure a user can meet ends in one line on stderr, and the exit status says which kind:

  0  done, or stopped by SIGTERM after saving a checkpoint (rerun to resume).
  1  the run failed while training: non-finite training (the message says what to change, in
     a new workdir), or checkpoints that could not be written (rerun to resume).
  2  the run could not start, and nothing was trained: a bad config or command line, a config
     that the data disagrees with, or a workdir holding another config's run ("Bad config:
     ..."); a workdir in use or not writable, or a dataset's missing source files ("Cannot
     run: ...").
  3  a multi-host peer never arrived within multihost.initialization_timeout_s.
"""

# The restart comes before the imports, which it would otherwise run twice.
from sdjax import host_memory

if __name__ == "__main__":
    host_memory.restart_with_huge_pages()

import json
import shlex
import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from sdjax import checkpointing, config_lib, datasets, multihost, train

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
        raised_by_config = _in_chain(error, config_lib.ConfigError)  # e.g. a bad profile
        if raised_by_config is not None:
            print(f"Bad config: {config_lib.one_line(raised_by_config)}", file=sys.stderr)
        else:
            print(f"{error}\nPass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    except Exception as error:  # the config file is missing or raised, or an override is
        print(f"Bad config: {_config_problem(argv, error)}", file=sys.stderr)
    sys.exit(2)


def _in_chain(error: BaseException | None, kind: type[Exception]) -> Exception | None:
    """The first exception of type `kind` raised in the chain that ended in `error`, or None
    (ml_collections re-raises a config file's error as one of its type with a traceback)."""
    found = None
    while error is not None:
        found = error if isinstance(error, kind) else found
        error = error.__cause__ or error.__context__
    return found


def _config_problem(argv: list[str], error: Exception) -> str:
    """What is wrong with the config of a command line whose parsing raised `error`: a missing
    or failing config file, or an override of a field that the config does not have."""
    path = _config_argument(argv)
    if not _config_file_exists(path):
        return f"--config: got {path!r}, no such config file."
    try:
        config = config_lib.load_config_file(path)
    except Exception as failure:
        detail = f"{type(failure).__name__}: {config_lib.one_line(failure)}"
        return f"--config: {path!r} does not load: {detail}"
    for arg in argv:
        if arg.startswith("--config."):
            try:
                config_lib.check_field(config, arg.split("=", 1)[0].removeprefix("--config."))
            except config_lib.ConfigError as missing:
                return f"--{config_lib.one_line(missing)}"
    return f"--config: {path!r}: {type(error).__name__}: {config_lib.one_line(error)}"


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
    logging.info("Config:\n%s", config)
    try:
        multihost.initialize(config)
        results = train.train_and_evaluate(config, workdir)  # which checks the config first
    except config_lib.ConfigError as error:
        print(f"Bad config: {config_lib.one_line(error)}", file=sys.stderr)
        return 2
    except (
        checkpointing.WorkdirUnusable,
        datasets.DataUnavailable,
        datasets.MissingExtra,
    ) as error:
        print(f"Cannot run: {config_lib.one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except (train.NonFiniteLoss, train.CheckpointWriteFailed) as error:
        if isinstance(error, train.CheckpointWriteFailed):
            checkpointing.drop_background_reports()  # they would only repeat the line below
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
