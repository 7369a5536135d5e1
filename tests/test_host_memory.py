"""sdjax.host_memory: when the process restarts with glibc's huge-page tunable, and what the
tunable does to XLA:CPU's per-call buffers."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdjax import host_memory

TUNABLE_ON = "glibc.malloc.hugetlb=1"
MADVISE, GLIBC_2_36 = "madvise", (2, 36)
ROOT = Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_to_an_environment_without_it():
    assert host_memory.huge_page_environment({"HOME": "/h"}, MADVISE, GLIBC_2_36) == {
        "HOME": "/h",
        "GLIBC_TUNABLES": TUNABLE_ON,
    }


def test_other_tunables_are_kept():
    environment = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlbx=3"}
    assert host_memory.huge_page_environment(environment, MADVISE, GLIBC_2_36) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.malloc.hugetlbx=3:{TUNABLE_ON}"
    }


@pytest.mark.parametrize("value", ["0", "1"])
def test_a_user_setting_of_the_tunable_is_left_alone(value):
    environment = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb={value}"}
    assert host_memory.huge_page_environment(environment, MADVISE, GLIBC_2_36) is None


@pytest.mark.parametrize(
    ("thp_mode", "glibc"),
    [
        ("always", GLIBC_2_36),  # malloc's big blocks get huge pages anyway
        ("never", GLIBC_2_36),  # none to get
        (None, GLIBC_2_36),  # no transparent huge pages at all
        (MADVISE, (2, 34)),  # a glibc without the tunable
        (MADVISE, None),  # not glibc
    ],
)
def test_no_restart_where_the_tunable_would_change_nothing(thp_mode, glibc):
    assert host_memory.huge_page_environment({}, thp_mode, glibc) is None


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
    ],
)
def test_the_kernels_mode_is_the_bracketed_one(tmp_path, text, mode):
    (tmp_path / "enabled").write_text(text)
    assert host_memory.transparent_huge_page_mode(tmp_path / "enabled") == mode


def test_no_mode_without_the_kernels_setting(tmp_path):
    assert host_memory.transparent_huge_page_mode(tmp_path / "missing") is None


def _this_machine_restarts() -> bool:
    facts = (host_memory.transparent_huge_page_mode(), host_memory.glibc_version())
    return host_memory.huge_page_environment({}, *facts) is not None


@pytest.mark.slow
def test_the_restart_runs_the_same_command_in_the_same_process():
    program = textwrap.dedent(
        """
        import json, os, sys
        print(json.dumps([os.getpid(), sys.argv[1:], sys._xoptions]), flush=True)
        from sdjax import host_memory
        host_memory.restart_with_huge_pages()
        print(json.dumps(os.environ.get("GLIBC_TUNABLES")))
        """
    )
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    done = subprocess.run(
        [sys.executable, "-X", "utf8", "-c", program, "a", "--b=1"],
        capture_output=True,
        text=True,
        env=environment,
        check=True,
    )
    *starts, tunables = [json.loads(line) for line in done.stdout.splitlines()]
    restarts = _this_machine_restarts()
    # Started twice when it restarts: the same PID, arguments and interpreter options.
    assert starts == [[starts[0][0], ["a", "--b=1"], {"utf8": True}]] * (2 if restarts else 1)
    assert tunables == (TUNABLE_ON if restarts else None)


def _faults_per_call(tunables: str) -> float:
    """experiments.page_faults' minimal program (a 256 MiB temporary that XLA allocates and
    frees at every call), its page faults per call under `tunables`."""
    environment = os.environ | {"GLIBC_TUNABLES": tunables, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "experiments.page_faults", "--program_worker=minimal", "--steps=4"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["page_faults_per_call"]


@pytest.mark.slow
def test_the_tunable_takes_xla_temporaries_from_huge_pages():
    """With 4 KiB pages a fresh 256 MiB block is 65,536 faults; with 2 MiB pages 128. Where the
    kernel's mode is not madvise the tunable changes nothing, which is why it is not set."""
    without = _faults_per_call("glibc.malloc.hugetlb=0")
    with_tunable = _faults_per_call(TUNABLE_ON)
    if _this_machine_restarts():
        assert without >= 64 * 2**20 * 4 / 4096  # every 4 KiB page of the block, at least
        assert with_tunable < without / 20
    else:
        assert with_tunable == pytest.approx(without, rel=0.5)
