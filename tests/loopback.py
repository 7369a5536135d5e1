"""Runs a 2-process jax.distributed job over 127.0.0.1 for the multi-host tests."""

import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(**variables) -> dict:
    """This environment without XLA_* (each process sets its own device count) plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    return env | {k: str(v) for k, v in variables.items()}


def start_two_hosts(worker, *args, cwd=None) -> list[subprocess.Popen]:
    """Starts `python worker *args` as processes 0 and 1 of a loopback run (SDJAX_* variables)."""
    address = f"127.0.0.1:{free_port()}"
    return [
        subprocess.Popen(
            [sys.executable, str(worker), *map(str, args)],
            cwd=cwd,
            env=clean_environment(
                SDJAX_COORDINATOR_ADDRESS=address,
                SDJAX_NUM_PROCESSES=2,
                SDJAX_PROCESS_ID=process_id,
                SDJAX_INITIALIZATION_TIMEOUT_S=60,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]


def run_two_processes(worker, *args, timeout=240, cwd=None):
    """Starts `python worker PORT PROCESS_ID *args` for process ids 0 and 1 and waits for both.

    Returns their outputs; fails the test if either times out or exits non-zero.
    """
    port = free_port()
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(process_id), *map(str, args)],
            cwd=cwd,
            env=clean_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]
    return wait_for_all(processes, timeout)


def wait_for_all(processes, timeout=240) -> list[str]:
    """The outputs of `processes`; fails the test if one times out or exits non-zero."""
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"a process of the 2-process run did not finish within {timeout} s")
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    return outputs
