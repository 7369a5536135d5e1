"""Joining a multi-host run: `jax.distributed` from config fields or environment variables.

Managed clusters (Cloud TPU, SLURM, ...) need nothing: `jax.distributed.initialize()` finds the
coordinator itself. Plain hosts say where to meet, by config field or environment variable (a
config field that is set wins):

| config field | environment variable | meaning |
|---|---|---|
| `multihost.coordinator_address` | `SDJAX_COORDINATOR_ADDRESS` | host:port of process 0 |
| `multihost.num_processes` | `SDJAX_NUM_PROCESSES` | how many processes run |
| `multihost.process_id` | `SDJAX_PROCESS_ID` | this process, 0..num_processes-1 |
| `multihost.initialization_timeout_s` | `SDJAX_INITIALIZATION_TIMEOUT_S` | wait for peers |
"""

from __future__ import annotations

import os
import sys
import threading

import jax
import ml_collections

from sdjax.config_lib import ConfigError

DEFAULT_TIMEOUT_S = 300
_ENVIRONMENT = {
    "coordinator_address": "SDJAX_COORDINATOR_ADDRESS",
    "num_processes": "SDJAX_NUM_PROCESSES",
    "process_id": "SDJAX_PROCESS_ID",
    "initialization_timeout_s": "SDJAX_INITIALIZATION_TIMEOUT_S",
}
_UNSET = {
    "coordinator_address": "",
    "num_processes": 0,
    "process_id": -1,
    "initialization_timeout_s": 0,
}


def settings(config: ml_collections.ConfigDict) -> dict:
    """The multi-host fields with the environment filled in where the config leaves them unset.

    Returns:
      {"enabled", "coordinator_address", "num_processes", "process_id",
      "initialization_timeout_s"}; unset ones are None (left to cluster auto-detection).
    """
    fields = config.multihost
    resolved = {}
    for name, variable in _ENVIRONMENT.items():
        value = fields[name]
        if value == _UNSET[name] and os.environ.get(variable):
            raw = os.environ[variable]
            try:
                value = raw if name == "coordinator_address" else int(raw)
            except ValueError:
                raise ConfigError(f"${variable}: got {raw!r}, expected an int.") from None
        resolved[name] = None if value == _UNSET[name] else value
    resolved["initialization_timeout_s"] = resolved["initialization_timeout_s"] or DEFAULT_TIMEOUT_S
    resolved["enabled"] = bool(fields.enabled or (resolved["num_processes"] or 0) > 1)
    count, index = resolved["num_processes"], resolved["process_id"]
    if count is not None and index is not None and not 0 <= index < count:
        raise ConfigError(
            f"config.multihost.process_id: got {index}, expected 0..{count - 1} "
            f"(num_processes = {count})."
        )
    address = resolved["coordinator_address"]
    host, _, port = (address or "").rpartition(":")
    if address is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"config.multihost.coordinator_address: got {address!r}, expected host:port "
            "(process 0's host and a free port, e.g. 10.0.0.1:1234)."
        )
    return resolved


def initialize(config: ml_collections.ConfigDict) -> None:
    """`jax.distributed.initialize` with the resolved settings, or nothing for one process.

    A peer that never arrives ends this process after the timeout with one line naming the
    coordinator: jax's own failure there is an abort with a C++ stack and no address.
    """
    resolved = settings(config)
    if not resolved["enabled"]:
        return
    timeout = resolved["initialization_timeout_s"]
    coordinator = resolved["coordinator_address"] or "(auto-detected)"
    joined = threading.Event()

    def give_up():
        if not joined.wait(timeout):
            print(
                f"Multi-host start failed: process {resolved['process_id']} of "
                f"{resolved['num_processes']} did not meet all peers at coordinator "
                f"{coordinator} within {timeout} s. Start every process with the same "
                "coordinator address and process count, or raise "
                "multihost.initialization_timeout_s.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(3)

    threading.Thread(target=give_up, daemon=True).start()
    try:
        jax.distributed.initialize(
            coordinator_address=resolved["coordinator_address"],
            num_processes=resolved["num_processes"],
            process_id=resolved["process_id"],
            initialization_timeout=timeout,
        )
    except ValueError:  # jax found no cluster to fill in what is unset; it names no field
        unset = [name for name in _UNSET if name in _CLUSTER_FILLS and resolved[name] is None]
        if not unset:
            raise
        raise ConfigError(_no_cluster_message(config, unset[0])) from None
    finally:
        joined.set()


_CLUSTER_FILLS = ("coordinator_address", "num_processes", "process_id")


def _no_cluster_message(config: ml_collections.ConfigDict, field: str) -> str:
    where = (
        "on plain hosts set multihost.coordinator_address (host:port), num_processes and "
        "process_id, as config fields or $SDJAX_* variables"
    )
    if config.multihost.enabled and field == "coordinator_address":
        return (
            "config.multihost.enabled: got True, but no cluster (Cloud TPU, SLURM, ...) was "
            f"detected to say where the processes meet; {where}."
        )
    got = repr(config.multihost[field])
    return (
        f"config.multihost.{field}: got {got} and no cluster was detected to provide it; "
        f"expected it set: {where}."
    )
