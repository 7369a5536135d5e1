"""A workdir holds one run: a lock, and orbax checkpoints that carry the run's config.

Each checkpoint has three items: `state` (model and optimiser), `config` (the run's flat config)
and `history` (the logged training curve up to that step), so a restored run continues its
curve without rewriting any file, and `python -m sdjax.evaluate` needs nothing but the workdir.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging as pylogging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sdjax import config_lib

CHECKPOINTS = "checkpoints"
UNREADABLE = "unreadable_checkpoints"  # where a checkpoint that fails to restore is moved


class WorkdirUnusable(RuntimeError):
    """The workdir cannot hold this run: another process holds it, or it is not writable."""


class WorkdirInUse(WorkdirUnusable):
    """Another process holds this workdir."""


class NoCheckpoint(FileNotFoundError):
    """The workdir does not exist, or holds no checkpoint that restores."""


def quiet_orbax_logs() -> None:
    """Drops orbax's INFO chatter (one line per save and restore step) from absl's log output,
    so that progress lines and one-line errors stay readable; orbax's warnings stay."""
    logging.get_absl_handler().addFilter(_QuietOrbax())


class _QuietOrbax(pylogging.Filter):
    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


# Where orbax's background errors arrive: absl's logger (orbax logs through absl) and asyncio's
# (the event loops orbax runs its writes in).
_BACKGROUND_LOGGERS = ("absl", "asyncio")


class _HeldErrors(pylogging.Filter):
    """Keeps the error records of orbax (logged through absl) and of the asyncio event loops
    that orbax runs its writes in, instead of passing them on."""

    def __init__(self):
        super().__init__()
        self.records: list[pylogging.LogRecord] = []

    def filter(self, record: pylogging.LogRecord) -> bool:
        if record.levelno >= pylogging.ERROR and (
            "orbax" in record.pathname or record.name == "asyncio"
        ):
            self.records.append(record)
            return False
        return True


@contextlib.contextmanager
def background_errors_held(reported_as: type[Exception]):
    """Holds back what orbax's and tensorstore's threads report while the block runs, and passes
    it on when the block ends, unless it raises `reported_as`.

    A save that fails while its files are written logs its error from orbax's threads, several
    times and each with a traceback, and tensorstore reports the writes still in flight as
    exceptions it cannot raise anywhere (`sys.unraisablehook`: "Event loop is closed", as orbax
    closed their event loop at the first error). The error is raised again in the caller's
    thread at the next save or wait, where the trainer reports it in one line (`reported_as`);
    what was held would only repeat it.
    """
    held = _HeldErrors()
    unraisable: list = []
    loggers = [pylogging.getLogger(name) for name in _BACKGROUND_LOGGERS]
    for logger in loggers:
        logger.addFilter(held)
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        yield
    except reported_as:
        held.records.clear()
        unraisable.clear()
        raise
    finally:
        sys.unraisablehook = previous_hook
        for logger in loggers:
            logger.removeFilter(held)
        for record in held.records:
            pylogging.getLogger(record.name).handle(record)
        for report in unraisable:
            previous_hook(report)


def drop_background_reports() -> None:
    """Drops, for the rest of the process, what orbax's and tensorstore's background work still
    reports after a failed checkpoint write was reported in one line.

    `background_errors_held` covers the training loop only. Writes still in flight when the
    trainer returns end later, and when they are collected, often at interpreter exit, after
    the one line, asyncio logs each task whose exception nobody retrieved ("Task exception was
    never retrieved") and Python warns of each write coroutine never awaited. For a command
    that is about to exit with the failure it reported.
    """
    dropped = _HeldErrors()  # its records are never passed on
    for name in _BACKGROUND_LOGGERS:
        pylogging.getLogger(name).addFilter(dropped)
    sys.unraisablehook = lambda report: None
    warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)


def check_directory(checkpoints: ocp.CheckpointManager) -> None:
    """Raises FileNotFoundError when the checkpoints' directory is gone or is not a directory.

    Orbax would make a removed one again and go on, its older checkpoints lost.
    """
    if not Path(checkpoints.directory).is_dir():
        raise FileNotFoundError("the directory was removed or replaced while training")


def make_workdir(workdir: Path) -> bool:
    """Creates `workdir` (and its parents) if needed; whether it was created.

    Raises:
      WorkdirUnusable: it cannot be created.
    """
    if workdir.is_dir():
        return False
    try:
        workdir.mkdir(parents=True)
    except OSError as error:
        raise _unwritable(workdir, error) from None
    return True


def _unwritable(workdir: Path, error: OSError) -> WorkdirUnusable:
    return WorkdirUnusable(
        f"workdir {workdir} is not writable ({type(error).__name__}: {error.strerror}); pass "
        "another --workdir."
    )


class WorkdirLock:
    """An exclusive lock per process index on `workdir`, released when the process ends.

    A run that fails before it wrote anything else (missing data, or a batch larger than a
    dataset whose size is known only once loaded) removes the lock file it made, and the
    workdir if it made that too (`created`): it leaves the workdir as it found it.
    """

    def __init__(self, workdir: Path, *, created: bool = False):
        self.path = workdir / f".lock.process{jax.process_index()}"
        self._created = created
        self._existed = self.path.exists()
        self._file = None

    def __enter__(self):
        try:
            self._file = self.path.open("a+")
        except OSError as error:
            raise _unwritable(self.path.parent, error) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise WorkdirInUse(
                f"workdir {self.path.parent} is in use by another run (pid {holder}); wait for "
                "it to finish, or pass another --workdir."
            ) from None
        self._file.truncate(0)
        self._file.write(str(os.getpid()))
        self._file.flush()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        if exc_value is not None and not self._existed:
            workdir = self.path.parent
            if {p.name for p in workdir.iterdir()} == {self.path.name}:  # nothing else written
                self.path.unlink()
                if self._created:
                    workdir.rmdir()


def manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (workdir / CHECKPOINTS).absolute(),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every_steps,
            max_to_keep=config.max_checkpoints_to_keep,
            # Each save makes its directories before it returns, so one that cannot be made
            # (checkpoints/ replaced by a file) fails there, in this thread. Made in the
            # background, the failure left orbax's writer threads waiting 5 minutes for them.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        ),
    )


def save_args(state, config: ml_collections.ConfigDict, history: list) -> ocp.args.Composite:
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_lib.flat_fields(config)),
        history=ocp.args.JsonSave(history),
    )


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def is_finite(tree) -> bool:
    """Whether every float leaf of `tree` is finite (one device reduction, one host read)."""
    return bool(
        _all_finite([x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)])
    )


def restore_latest(
    workdir: Path, config: ml_collections.ConfigDict, state
) -> tuple[ocp.CheckpointManager, int, dict, list]:
    """The newest checkpoint that restores, with its step, state and history.

    A checkpoint that fails to restore (truncated, emptied, partly deleted) is logged, moved to
    workdir/unreadable_checkpoints, and the next older one is tried. A checkpoint written with a
    config that changes results stops the run.

    Returns:
      (a fresh manager, step (0 = none), the restored state or `state`, history).

    Raises:
      config_lib.ConfigError: the stored config differs in fields that change results.
    """
    checkpoints = manager(workdir, config)
    step, restored, unreadable = _newest_that_restores(
        checkpoints,
        ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
            config=ocp.args.JsonRestore(),
            history=ocp.args.JsonRestore(),
        ),
    )
    if restored is None:
        _set_aside(workdir, unreadable)
        return manager(workdir, config) if unreadable else checkpoints, 0, state, []
    _check_same_run(restored["config"], config, workdir, step)
    _set_aside(workdir, unreadable)
    logging.info("Resumed from the checkpoint at step %d.", step)
    return manager(workdir, config), step, restored["state"], list(restored["history"])


def _newest_that_restores(
    checkpoints: ocp.CheckpointManager, args: ocp.args.Composite
) -> tuple[int, dict | None, list[int]]:
    """(step, restored items, the newer steps that failed), newest first; (0, None, failed) when
    none restores. Each failure is logged as a warning."""
    unreadable: list[int] = []
    for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
            return step, checkpoints.restore(step, args=args), unreadable
        except Exception as error:  # orbax raises many kinds for damaged files
            logging.warning(
                "Checkpoint %d in %s does not restore (%s: %s); trying an older one.",
                step,
                checkpoints.directory,
                type(error).__name__,
                str(error).splitlines()[0][:200] if str(error) else "",
            )
            unreadable.append(step)
    return 0, None, unreadable


def _check_same_run(stored: dict, config: ml_collections.ConfigDict, workdir: Path, step: int):
    differences = config_lib.result_changing_differences(stored, config_lib.flat_fields(config))
    if differences:
        raise config_lib.ConfigError(
            f"workdir {workdir} holds a run with another config (checkpoint {step}): "
            + "; ".join(differences)
            + ". Use another --workdir, or the stored config."
        )


def _set_aside(workdir: Path, steps: list[int]) -> None:
    """Moves unreadable checkpoints out of orbax's way, keeping them for inspection."""
    if not steps:
        return
    multihost_utils.sync_global_devices("sdjax: checkpoints read")
    if jax.process_index() == 0:
        destination = workdir / UNREADABLE
        destination.mkdir(exist_ok=True)
        for step in steps:
            target = destination / str(step)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(workdir / CHECKPOINTS / str(step)), target)
            logging.warning("Moved unreadable checkpoint %d to %s.", step, target)
    multihost_utils.sync_global_devices("sdjax: unreadable checkpoints set aside")


def _read_only_manager(workdir: Path) -> ocp.CheckpointManager:
    """A manager that neither creates, saves nor deletes anything in `workdir`/checkpoints."""
    directory = (Path(workdir) / CHECKPOINTS).absolute()
    if not directory.is_dir():
        what = "does not exist" if not Path(workdir).exists() else f"has no {CHECKPOINTS}/"
        raise NoCheckpoint(f"workdir {workdir} {what}.")
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0, max_to_keep=None
        ),
    )


def restore_newest(workdir: Path, state: Any) -> tuple[int, Any]:
    """(step, the `state` item) of the newest checkpoint of `workdir` that restores, shaped and
    sharded like `state`; older ones are tried past damaged ones, and nothing is written.

    Raises:
      NoCheckpoint: none restores.
    """
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with _read_only_manager(workdir) as checkpoints:
        step, restored, _ = _newest_that_restores(
            checkpoints, ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    if restored is None:
        raise NoCheckpoint(f"workdir {workdir}: no checkpoint restores.")
    return step, restored["state"]


def restore_state(workdir: Path, step: int, state):
    """The `state` item of checkpoint `step`, shaped and sharded like `state`."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    with _read_only_manager(workdir) as checkpoints:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        return checkpoints.restore(step, args=args)["state"]


def stored_config(workdir: Path) -> tuple[ml_collections.ConfigDict, int]:
    """The config of the newest checkpoint in `workdir` whose config restores, as a locked
    ConfigDict, and its step. Nothing is written.

    Raises:
      NoCheckpoint: `workdir` does not exist or holds no checkpoint whose config restores.
    """
    with _read_only_manager(workdir) as checkpoints:
        step, restored, _ = _newest_that_restores(
            checkpoints, ocp.args.Composite(config=ocp.args.JsonRestore())
        )
    if restored is None:
        raise NoCheckpoint(f"workdir {workdir}: no checkpoint restores.")
    nested: dict[str, Any] = {}
    for name, value in restored["config"].items():
        *parents, leaf = name.split(".")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    config = ml_collections.ConfigDict(nested)
    config.lock()
    return config, step
