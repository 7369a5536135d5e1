"""Runs a 2-process jax.distributed job over 127.0.0.1 for the multi-host tests."""

import os
import socket
import subprocess
import sys

import pytest


def run_two_processes(worker, *args, timeout=240, cwd=None):
    """Starts `python worker PORT PROCESS_ID *args` for process ids 0 and 1 and waits for both.

    Returns their outputs; fails the test if either times out or exits non-zero.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Each process sets its own device count; an inherited XLA_FLAGS would override it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(process_id), *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]
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
