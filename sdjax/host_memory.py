"""Huge pages for XLA:CPU's buffers: glibc's `glibc.malloc.hugetlb=1`, set by restarting.

XLA:CPU allocates a program's temporaries (a training step's activations and gradients, one
block of hundreds of MB) with `malloc` at every call and frees them when it returns. glibc
serves a block that large with `mmap` and gives it back with `munmap`, so every step touches
fresh memory: with Linux's 4 KiB pages, ResNet-50's step at 64 images of 64 px (a 658 MB
block) took 181,000 page faults and about 0.4 s of kernel time per step on the project's
2-core CPU, a sixth of its CPU time (`python -m experiments.page_faults` measures it).

With the tunable, glibc asks the kernel for transparent huge pages on such blocks
(`madvise(MADV_HUGEPAGE)`): 2 MiB pages, about 1,200 faults per step, and the step 8-20%
faster in the project's measurements (experiments/README.md). Results do not change: only
where the memory comes from. That matters only where the kernel's transparent huge pages are
in `madvise` mode (many distributions' default); in `always` mode the blocks get huge pages
anyway, in `never` mode none.

glibc reads its tunables when a process starts, so an entry point calls
`restart_with_huge_pages()` first thing: it runs the same command again in the same process
(`os.execve`) with the tunable added to `GLIBC_TUNABLES`, when that would change something.
A `GLIBC_TUNABLES` that sets `glibc.malloc.hugetlb` itself (`=0` to opt out) is left alone.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
# glibc 2.35 added the tunable; older versions ignore it.
MIN_GLIBC = (2, 35)
TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_page_mode(path: Path = TRANSPARENT_HUGE_PAGES) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where
    there is no such setting (not Linux, or a kernel without them)."""
    try:
        selected = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return selected.group(1) if selected else None


def glibc_version() -> tuple[int, ...] | None:
    """The C library's version if it is glibc, else None (musl, macOS, Windows)."""
    library, version = platform.libc_ver()
    if library != "glibc" or not version:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", version))


def huge_page_environment(
    environ: Mapping[str, str],
    thp_mode: str | None,
    glibc: tuple[int, ...] | None,
) -> dict[str, str] | None:
    """`environ` with `glibc.malloc.hugetlb=1` added to `GLIBC_TUNABLES`, or None where that
    would change nothing: the tunable already set (to any value), no glibc that knows it, or
    transparent huge pages not in `madvise` mode."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    already_set = any(item.split("=")[0] == TUNABLE for item in tunables.split(":"))
    if already_set or glibc is None or glibc < MIN_GLIBC or thp_mode != "madvise":
        return None
    added = f"{TUNABLE}=1"
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{added}" if tunables else added}


def restart_with_huge_pages() -> None:
    """Runs this process's command again with `glibc.malloc.hugetlb=1` when that changes
    something (see `huge_page_environment`); returns, doing nothing, otherwise. Call it under
    a program's `if __name__ == "__main__":` before any work, and before its heavy imports,
    which a restart would run again."""
    environment = huge_page_environment(os.environ, transparent_huge_page_mode(), glibc_version())
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv keeps the interpreter's own options and `-m module`; the PID stays.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
