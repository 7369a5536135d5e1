"""What fresh memory costs XLA:CPU at every call, with and without huge pages.

XLA:CPU allocates a program's temporaries with `malloc` at each call and frees them at its end;
glibc serves a block over 32 MiB with `mmap` and returns it with `munmap`, so each call faults
its temporaries in afresh, 4 KiB at a time (`sdjax.host_memory`). This times two programs in
child processes under three settings of `GLIBC_TUNABLES`, alternately, round after round, and
counts each call's minor page faults and kernel time, and each process's peak memory:

- glibc's default (`glibc.malloc.hugetlb=0`);
- huge pages (`glibc.malloc.hugetlb=1`, what sdjax's entry points set);
- huge pages and one heap kept: every thread allocating from one arena (`arena_max=1`),
  never by `mmap` (`mmap_max=0`), and the heap never trimmed, so the temporaries' memory stays
  mapped from call to call (not sdjax's default: it holds more memory).

The programs:

- `minimal`: `cos(sin(x))` summed, `x` 64M float32, the `sin` kept as a 256 MiB temporary;
- `resnet50`: experiments/bench_train's ResNet-50 training step (64 images of 64 px, one
  658 MB temporary block).

Writes `experiments/results/page_faults.{json,md}`.

COMMAND (from the repository root):
  .venv/bin/python -m experiments.page_faults --rounds=3     # both programs
  .venv/bin/python -m experiments.page_faults --programs=minimal
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import bench_train
from experiments.bench_loss import cpu_model, peak_rss_mb
from sdjax import host_memory

PROGRAMS = ("minimal", "resnet50")
HUGE_PAGES = f"{host_memory.TUNABLE}=1"
SETTINGS = {
    "glibc's default (4 KiB pages)": f"{host_memory.TUNABLE}=0",
    "huge pages": HUGE_PAGES,
    "huge pages, one heap kept": f"{HUGE_PAGES}:glibc.malloc.arena_max=1:"
    f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={2**40}",
}
REPOSITORY = Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
# bench_train (imported above) defines --rounds, --steps (timed calls; 0: 8 here) and --out_dir.
flags.DEFINE_list("programs", list(PROGRAMS), f"From {list(PROGRAMS)}.")
flags.DEFINE_string("program_worker", "", "Internal: the program to time in this process.")


def program(name: str):
    """A function that makes one call and waits for it."""
    import jax
    import jax.numpy as jnp

    if name == "resnet50":
        run, *_ = bench_train.sdjax_step("resnet50", 32, 64, 0, False)
        return run

    @jax.jit
    def minimal(x):
        return jnp.sum(jnp.cos(jax.lax.optimization_barrier(jnp.sin(x))))

    x = jnp.ones(64 * 2**20, jnp.float32)
    return lambda: minimal(x).block_until_ready()


def worker(name: str, calls: int) -> dict:
    run = program(name)
    run()
    run()
    times, _, usage = bench_train.timed_calls(run, calls)
    return {
        "median_call_s": float(np.median(times)),
        "page_faults_per_call": usage["page_faults"],
        "user_s_per_call": usage["user_s"],
        "system_s_per_call": usage["system_s"],
        "peak_memory_mb": peak_rss_mb(),
    }


def run_worker(name: str, tunables: str, calls: int) -> dict:
    environment = os.environ | {"GLIBC_TUNABLES": tunables}
    command = [sys.executable, "-m", "experiments.page_faults", f"--program_worker={name}"]
    done = subprocess.run(
        [*command, f"--steps={calls}"],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPOSITORY,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    calls = FLAGS.steps or 8
    if FLAGS.program_worker:
        print(json.dumps(worker(FLAGS.program_worker, calls)))
        return
    if set(FLAGS.programs) - set(PROGRAMS):
        raise app.UsageError(f"--programs: got {FLAGS.programs}, expected names from {PROGRAMS}")
    load_before, started = bench_train.load_line(), datetime.datetime.now(datetime.UTC)
    rows = {(name, setting): [] for name in FLAGS.programs for setting in SETTINGS}
    for round_index in range(FLAGS.rounds):
        for name, setting in rows:
            result = run_worker(name, SETTINGS[setting], calls)
            print(json.dumps({"round": round_index, "program": name, "setting": setting, **result}))
            rows[(name, setting)].append(result)
    lines = [
        f"# Page faults of XLA:CPU's temporaries ({cpu_model()}, {os.cpu_count()} cores)",
        "",
        f"- date: {started:%Y-%m-%d %H:%M} UTC; load average {load_before} at the start, "
        f"{bench_train.load_line()} at the end; transparent huge pages "
        f"`{host_memory.transparent_huge_page_mode()}`",
        f"- each program and setting in its own process, alternating, {FLAGS.rounds} rounds of "
        f"{calls} calls after a compile and a warm-up call; call: the median of a round's, "
        "faults and CPU times: per call, the mean over the rounds; peak memory: the process's "
        "VmHWM, the largest over the rounds; ratio: each round's call over the default's",
        *[f"- {setting}: `GLIBC_TUNABLES={tunables}`" for setting, tunables in SETTINGS.items()],
        f"- command: `{' '.join(['python -m experiments.page_faults', *sys.argv[1:]])}`",
        "",
        "| program | glibc malloc | call (ms), each round | page faults / call | "
        "kernel time / call (ms) | user time / call (ms) | peak memory (MB) | "
        "call / default's, each round |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for (name, setting), results in rows.items():
        default = rows[(name, next(iter(SETTINGS)))]
        pairs = zip(results, default, strict=True)
        ratios = [r["median_call_s"] / d["median_call_s"] for r, d in pairs]
        lines.append(
            f"| {name} | {setting} | "
            + ", ".join(f"{1e3 * r['median_call_s']:.0f}" for r in results)
            + f" | {np.mean([r['page_faults_per_call'] for r in results]):,.0f} | "
            f"{1e3 * np.mean([r['system_s_per_call'] for r in results]):.0f} | "
            f"{1e3 * np.mean([r['user_s_per_call'] for r in results]):.0f} | "
            f"{max(r['peak_memory_mb'] for r in results):,.0f} | "
            + ", ".join(f"{ratio:.2f}" for ratio in ratios)
            + " |"
        )
    out_dir = Path(FLAGS.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {f"{name} | {setting}": results for (name, setting), results in rows.items()}
    (out_dir / "page_faults.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "page_faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
