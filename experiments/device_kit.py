"""The device kit: every accelerator measurement in one short call, packed here, run there.

An accelerator is lent rarely and briefly: 15 minutes of machine time in all, at most 10 per
command, and 64 MiB of files (the working tree included) sent with each command. Its image has
JAX (CUDA), flax, optax, orbax, scikit-learn, PyTorch and TensorBoard, but no network and none
of tensorflow-datasets, grain, array_record, clu, ml_collections or tensorboardX. `pack` puts
those wheels and the prepared datasets into parts under `.kit/` (ignored by git), each small
enough to travel with the working tree. `run` installs them (no network), then runs each
measurement in its own process group under its own time budget, in this order:

  loss_f32    experiments/bench_loss.py --gpu --precision=default (float32, TF32 matmuls)
  loss_bf16   experiments/bench_loss.py --gpu --precision=bfloat16
  train       experiments/bench_train.py --gpu: ResNet-50 and ResNet-18 steps, bfloat16,
              sdjax against torch.compile, with MFU
  max_batch   the largest power-of-two batch of sdjax's ResNet-50 step that fits
  grad_cache  one gradient-cached ResNet-50 step on 65,536 views (32,768 examples x 2)
  suite       the `gpu` experiment profile (run_experiments) on Yeast, for the time left

A measurement that overruns its budget is stopped (its process group killed) and the next one
starts; what it printed is kept. Without an accelerator `run` rehearses the same steps at tiny
sizes (tests/test_device_kit.py does this in a virtual environment of the image's packages).

Results go to $OUT (kit.json, kit.md, logs.txt, outputs.tar.gz: at most 8 files come back)
and are merged into experiments/results/device/: runs.json keeps every run (a rerun of the same
run replaces it, others are added), summary.md shows the newest row of each measurement per
hardware, and the gpu profile's finished runs join experiments/results/gpu/runs/.

COMMANDS (from the repository root):
  python -m experiments.device_kit pack     # here; prints the device command to use
  python3 experiments/device_kit.py run     # there, with .kit/part-1 carried (see README)
  python -m experiments.device_kit merge DIR   # here: a run's returned $OUT files
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
KIT_DIR = REPOSITORY / ".kit"
RESULTS = REPOSITORY / "experiments" / "results"
MIB = 2**20
CALL_LIMIT_MIB = 64  # what one device command may take along, working tree included

# What the image lacks: the training stack's small packages, and those of their needs that the
# image does not have (found by running the kit in a virtual environment of the image's list).
KIT_PACKAGES = (
    "tensorflow-datasets",
    "array_record",
    "grain",
    "clu",
    "ml-collections",
    "tensorboardX",
    "dm-tree",
    "immutabledict",
    "promise",
    "tensorflow-metadata",
    "toml",
    "portpicker",
)
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
SUITE_DATASETS = ("yeast",)  # what the suite step trains on, prepared by `pack`

# (name, budget in seconds on the accelerator): they sum to the 8 minutes one call should take,
# with the suite last, given whatever the others leave.
STEPS = (
    ("loss_f32", 70),
    ("loss_bf16", 60),
    ("train", 200),
    ("max_batch", 50),
    ("grad_cache", 60),
    ("suite", 40),
)
TINY_BUDGET_S = 150  # each step's budget in a rehearsal (a loaded 2-core machine)
SUITE_TIME_UP = "time up (finished runs kept; a rerun continues)"
SUITE_FIRST_RUN = "stopped after its first run (a rehearsal)"
GPU = {  # the accelerator's sizes
    "loss_sizes": "16384,65536,262144",
    "loss_repeats": 5,
    "train_archs": "resnet50,resnet18",  # ResNet-50 (the target's network) first
    "train_steps": 10,
    "max_batch_arch": "resnet50",
    "max_batch_start": 512,  # the train step measured 256
    "max_batch_limit": 2**16,
    "grad_cache": {"arch": "resnet50", "examples": 32768, "chunk": 1024, "image_size": 112},
    "suite_profile": "gpu",
}
TINY = {  # a rehearsal's sizes: every code path, in seconds
    "loss_sizes": "256",
    "loss_repeats": 1,
    "train_archs": "resnet18",
    "train_steps": 1,
    "train_size": ["--image_size=32", "--batch_size=4"],
    "max_batch_arch": "resnet18",
    "max_batch_start": 4,  # the train step's program: compiled already, in the JAX cache
    "max_batch_limit": 4,
    "grad_cache": {"arch": "resnet18", "examples": 16, "chunk": 8, "image_size": 32},
    "suite_profile": "quick",
}


# --------------------------------------------------------------------------------------------
# pack (here)
# --------------------------------------------------------------------------------------------


def pinned_version(package: str) -> str:
    """requirements.txt's pin, else the version installed here (where the tests ran)."""
    wanted = _normalise(package)
    for line in (REPOSITORY / "requirements.txt").read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if version and _normalise(name) == wanted:
            return version.strip()
    return importlib.metadata.version(package)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(directory: Path) -> list[Path]:
    """Python 3.12 x86-64 wheels of KIT_PACKAGES at their pinned versions, one each, kept in
    `directory` between packs; a package published as source only is built into a wheel here
    (those are pure Python)."""
    directory.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    wheels = []
    for package in KIT_PACKAGES:
        requirement = f"{package}=={pinned_version(package)}"
        if not _cached_wheel(directory, requirement):
            download = [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(directory)]
            download += ["--python-version", "3.12", "--implementation", "cp", *platforms]
            download += ["--platform", "any", requirement]
            if subprocess.run(download, capture_output=True, text=True).returncode != 0:
                build = [*pip, "wheel", "--no-deps", "-w", str(directory), requirement]
                subprocess.run(build, check=True, capture_output=True, text=True)
        wheels.append(_cached_wheel(directory, requirement))
    return wheels


def _cached_wheel(directory: Path, requirement: str) -> Path | None:
    """The wheel of `requirement` (NAME==VERSION) in `directory`, if there is one."""
    prefix = _normalise(requirement.replace("==", "-")) + "-"
    return next((w for w in directory.glob("*.whl") if _normalise(w.name).startswith(prefix)), None)


def prepare_datasets(names, data_dir: Path, tar_dir: Path) -> list[Path]:
    """Prepares each dataset into `data_dir` (as training would) and tars its folders."""
    from sdjax import datasets

    tar_dir.mkdir(parents=True, exist_ok=True)
    tars = []
    for name in names:
        for split in ("train", "test"):
            datasets.load_split(name, split, data_dir=str(data_dir))
        dataset = datasets.DATASETS[name]
        folders = [dataset.builder.split("/")[0]] if dataset.builder else [name]
        if name == "debtags":
            folders.append("sdjax_tokenizers")  # trained on first load, kept with the data
        path = tar_dir / f"data-{name}.tar"
        with tarfile.open(path, "w") as tar:
            for folder in folders:
                tar.add(data_dir / folder, arcname=folder)
        tars.append(path)
    return tars


def traveling_tree_mib(repository: Path = REPOSITORY) -> float:
    """MiB of what a device command sends besides carried paths: tracked and untracked files
    that git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repository,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = (repository / os.fsdecode(name) for name in listed if name)
    return sum(f.stat().st_size for f in files if f.is_file()) / MIB


def split_into_parts(files: list[Path], limit_bytes: int) -> list[list[Path]]:
    """Files grouped into as few parts as first-fit-decreasing finds, each <= `limit_bytes`."""
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for path in sorted(files, key=lambda p: -p.stat().st_size):
        size = path.stat().st_size
        if size > limit_bytes:
            raise ValueError(
                f"{path.name}: {size / MIB:.1f} MiB, expected <= the part size "
                f"{limit_bytes / MIB:.1f} MiB; pack fewer datasets or shrink the working tree."
            )
        fits = next((i for i, used in enumerate(sizes) if used + size <= limit_bytes), None)
        if fits is None:
            parts.append([])
            sizes.append(0)
            fits = len(parts) - 1
        parts[fits].append(path)
        sizes[fits] += size
    return parts


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(kit_dir: Path, datasets, part_mib: float | None) -> list[Path]:
    """Writes kit_dir/part-1, part-2, ...: wheels, dataset tars and a manifest in each."""
    tree = traveling_tree_mib()
    part_mib = part_mib or CALL_LIMIT_MIB - 4 - tree  # 4 MiB spare for files added later
    if part_mib < 8:
        raise SystemExit(
            f"the working tree alone is {tree:.1f} MiB of the {CALL_LIMIT_MIB} MiB a device "
            "command may take: nothing useful fits beside it."
        )
    cache = kit_dir / "cache"
    files = download_wheels(cache / "wheels")
    files += prepare_datasets(datasets, cache / "tensorflow_datasets", cache / "data")
    groups = split_into_parts(files, int(part_mib * MIB))
    for old in kit_dir.glob("part-*"):
        shutil.rmtree(old)
    kit_id = hashlib.sha256("".join(sha256(f) for f in sorted(files)).encode()).hexdigest()[:12]
    parts = []
    for number, group in enumerate(groups, 1):
        part = kit_dir / f"part-{number}"
        part.mkdir(parents=True)
        for path in group:
            shutil.copy2(path, part / path.name)
        manifest = {
            "kit": kit_id,
            "part": number,
            "parts": len(groups),
            "files": {p.name: sha256(p) for p in group},
            "datasets": list(datasets),
        }
        (part / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        parts.append(part)
    return parts


def device_commands(parts: list[Path]) -> list[dict]:
    """The `run` tool calls that bring the parts over and run the kit: one per part."""
    calls = []
    for part in parts[:-1]:  # carried alone; ignored paths stay on the warm machine
        calls.append({"command": "true", "carry": [_relative(part)], "timeout_s": 60})
    calls.append(
        {
            "command": "python3 experiments/device_kit.py run",
            "carry": [_relative(parts[-1])],
            "timeout_s": 560,
        }
    )
    return calls


def _relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPOSITORY))
    return str(path)


# --------------------------------------------------------------------------------------------
# run (there)
# --------------------------------------------------------------------------------------------


class Kit:
    """One `run`: the installed parts, the environment its steps run in, and their records."""

    def __init__(self, kit_dir: Path, out_dir: Path, work_dir: Path, budget_s: float):
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.out_dir, self.work_dir = out_dir, work_dir
        self.site, self.data = work_dir / "site", work_dir / "tensorflow_datasets"
        self.log = io.StringIO()
        self.record = {
            "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "steps": [],
        }
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.site), str(REPOSITORY)]),
            "TFDS_DATA_DIR": str(self.data),
            "PYTHONUNBUFFERED": "1",
            # One the caller chose (a rehearsal's: the tests' cache), else the work dir's.
            "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
            or str(work_dir / "jax_cache"),
            # A benchmark's parent process holds JAX too (device names, a matmul rate): without
            # this it would take 75% of the GPU before its workers start.
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9",
        }
        self.install(kit_dir)

    def say(self, text: str) -> None:
        line = f"[kit {time.monotonic() - self.start:5.0f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def install(self, kit_dir: Path) -> None:
        """Checks the parts (every part of the newest kit here; a warm machine may still hold
        older kits' parts, which are left alone), installs the wheels, unpacks the data."""
        paths = sorted(kit_dir.glob("part-*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if not paths:
            raise SystemExit(
                f"no kit parts in {kit_dir}: run `python -m experiments.device_kit pack`"
            )
        newest = json.loads(paths[-1].read_text())
        manifests = [m for m in map(json.loads, map(Path.read_text, paths))]
        manifests = sorted(
            (m for m in manifests if m["kit"] == newest["kit"]), key=lambda m: m["part"]
        )
        numbers = [m["part"] for m in manifests]
        if numbers != list(range(1, newest["parts"] + 1)):
            raise SystemExit(
                f"kit {newest['kit']} in {kit_dir}: got parts {numbers}, expected 1.."
                f"{newest['parts']}; carry every part of one `pack` (one call each)."
            )
        files = [kit_dir / f"part-{m['part']}" / name for m in manifests for name in m["files"]]
        wheels = [f for f in files if f.suffix == ".whl"]
        shutil.rmtree(self.site, ignore_errors=True)
        install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        install += ["--no-compile", "--disable-pip-version-check", "--target", str(self.site)]
        subprocess.run([*install, *map(str, wheels)], check=True)
        self.data.mkdir(parents=True, exist_ok=True)
        for tar in (f for f in files if f.suffix == ".tar"):
            with tarfile.open(tar) as archive:
                archive.extractall(self.data, filter="data")
        self.record["kit"] = manifests[0]["kit"]
        self.record["datasets"] = manifests[0]["datasets"]
        self.say(f"installed {len(wheels)} wheels and {manifests[0]['datasets']} from {kit_dir}")

    def python(self, code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise RuntimeError(done.stderr.strip()[-2000:])
        return done.stdout.strip()

    def describe_machine(self) -> None:
        versions = {}
        packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch")
        for package in (*packages, "protobuf", "etils", "tensorboard"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[package] = importlib.metadata.version(package)
        self.record["versions"] = versions
        self.record["python"] = sys.version.split()[0]
        self.record |= json.loads(self.python(MACHINE_PROBE))
        self.say(f"{self.record['hardware']}; {versions}")
        try:  # the training stack on the image's packages: if this fails, the log says why
            self.python("import sdjax.train, sdjax.datasets, experiments.run_experiments")
            self.record["training_stack"] = "imports"
        except RuntimeError as error:
            self.record["training_stack"] = f"fails to import: {str(error)[-500:]}"
        self.say(f"training stack {self.record['training_stack']}")

    def run_step(self, name: str, command: list[str], budget_s: float, done_when=None) -> dict:
        """Runs `command` in its own process group for at most `budget_s`, or until `done_when()`
        (polled each second) is true; its output goes to the log. Returns {"status", "wall_s",
        "output"}."""
        self.say(f"{name}: {' '.join(command[1:])} (budget {budget_s:.0f} s)")
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as output:
            process = subprocess.Popen(
                command,
                cwd=REPOSITORY,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its workers too are stopped with it
            )
            deadline = start + max(budget_s, 1)
            while (code := process.poll()) is None and time.monotonic() < deadline:
                if done_when is not None and done_when():
                    break
                time.sleep(1)
            if code is not None:
                status = "ok" if code == 0 else f"failed (exit {code})"
            else:
                _stop_group(process)
                status = f"stopped at its budget of {budget_s:.0f} s"
                if time.monotonic() < deadline:
                    status = "stopped: done"
            output.seek(0)
            text = output.read()
        wall = time.monotonic() - start
        self.log.write(f"----- {name} ({status}, {wall:.0f} s) -----\n{text}\n")
        self.say(f"{name}: {status} after {wall:.0f} s")
        return {"status": status, "wall_s": round(wall, 1), "output": text}

    def time_left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


MACHINE_PROBE = """
import json, jax
from experiments.suite import hardware_name
stats = jax.devices()[0].memory_stats() or {}
print(json.dumps({
    "hardware": hardware_name(),
    "accelerator": jax.default_backend(),
    "memory_bytes": stats.get("bytes_limit"),  # what JAX may allocate; None on a CPU
}))
"""


def _stop_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def json_lines(text: str) -> list[dict]:
    """The JSON objects a script printed one per line (bench_train's rows, a worker's result)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def measure(kit: Kit, sizes: dict, budgets: dict, gpu: bool) -> None:
    """Runs the steps in order, each under its budget, recording rows after each one."""
    py = sys.executable
    gpu_flag = ["--gpu"] if gpu else []
    for name, budget in budgets.items():
        out = kit.work_dir / "outputs" / name
        out.mkdir(parents=True, exist_ok=True)
        if name == "suite":  # the last: whatever the others left, less time to write outputs
            budget = max(budget, kit.time_left() - 20) if gpu else budget
        step, step_start = {"name": name, "budget_s": budget}, time.monotonic()
        if name.startswith("loss_"):
            precision = {"loss_f32": "default", "loss_bf16": "bfloat16"}[name]
            command = [py, "-m", "experiments.bench_loss", *gpu_flag, f"--precision={precision}"]
            command += [f"--sizes={sizes['loss_sizes']}", "--impls=sdjax,torch_compile"]
            command += [f"--repeats={sizes['loss_repeats']}", f"--timeout={int(budget)}"]
            command += [f"--out_dir={out}"] + ([] if gpu else ["--matmul_size=256"])
            step |= kit.run_step(name, command, budget)
            tables = sorted(out.glob("bench_loss*.json"))
            rows = json.loads(tables[0].read_text()) if tables else []
            step["rows"] = [{"precision": precision, **r} for r in rows]
        elif name == "train":
            command = [py, "-m", "experiments.bench_train", *gpu_flag]
            command += [f"--archs={sizes['train_archs']}", "--impls=sdjax,torch_compile"]
            command += [f"--steps={sizes['train_steps']}", f"--timeout={int(budget)}"]
            command += ["--nomax_batch", f"--out_dir={out}", *sizes.get("train_size", [])]
            step |= kit.run_step(name, command, budget)
            step["rows"] = [r for r in json_lines(step["output"]) if "impl" in r]
            step["speedups"] = train_speedups(step["rows"])
        elif name == "max_batch":
            step |= largest_batch(kit, sizes, budget, gpu_flag)
        elif name == "grad_cache":
            case = sizes["grad_cache"]
            worker = f"--train_worker=sdjax,{case['arch']},{case['examples']},{case['chunk']}"
            command = [py, "-m", "experiments.bench_train", worker, *gpu_flag, "--steps=1"]
            command += [f"--image_size={case['image_size']}"]
            step |= kit.run_step(name, command, budget)
            rows = json_lines(step["output"])
            step["rows"] = [r | {"views": 2 * r["batch_size"], "status": "ok"} for r in rows]
        elif name == "suite":
            command = [
                py,
                "-m",
                "experiments.run_experiments",
                f"--profile={sizes['suite_profile']}",
            ]
            command += [f"--datasets={','.join(kit.record['datasets'])}", "--sections=comparison"]
            command += [f"--results_dir={out}", f"--workdir={kit.work_dir / 'suite_workdirs'}"]
            command += [f"--data_dir={kit.data}"]
            # A rehearsal stops after the first finished run: it shows the path works.
            runs = out / sizes["suite_profile"] / "runs"
            first_run = None if gpu else lambda runs=runs: any(runs.rglob("*.json"))
            step |= kit.run_step(name, command, budget, done_when=first_run)
            if step["status"] == "stopped: done":
                step["status"] = SUITE_FIRST_RUN
            elif step["status"].startswith("stopped"):  # as planned: it takes the time left
                step["status"] = SUITE_TIME_UP
            step["rows"] = suite_rows(out / sizes["suite_profile"])
            step["profile"] = sizes["suite_profile"]
        step["output_tail"] = step.pop("output")[-3000:]
        step["wall_s"] = round(time.monotonic() - step_start, 1)
        kit.record["steps"].append(step)
        write_outputs(kit)


def train_speedups(rows: list[dict]) -> dict:
    """sdjax's samples/s over torch.compile's, per network (the target is >= 1.2 for ResNet-50)."""
    speed = {(r["arch"], r["impl"]): r["samples_per_s"] for r in rows if r.get("status") == "ok"}
    return {
        arch: round(speed[(arch, "sdjax")] / speed[(arch, "torch_compile")], 3)
        for arch, impl in speed
        if impl == "sdjax" and (arch, "torch_compile") in speed
    }


OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemoryError")


def first_batch_to_try(sizes: dict, train_rows: list[dict], memory_bytes: int | None) -> int:
    """Where the largest-batch search starts: the largest power of two that the train step's
    peak memory, grown linearly from its batch, predicts to fit (each try costs a compilation,
    so the search should start near the answer); else `max_batch_start`."""
    measured = next(
        (
            r
            for r in train_rows
            if r.get("status") == "ok"
            and r["impl"] == "sdjax"
            and r["arch"] == sizes["max_batch_arch"]
            and not r.get("chunk_size")
        ),
        None,
    )
    if not measured or not memory_bytes:
        return sizes["max_batch_start"]
    per_example = measured["peak_memory_mb"] * MIB / measured["batch_size"]  # an upper bound
    batch = 2 ** max(0, int(math.log2(max(memory_bytes / per_example, 1))))
    return min(max(batch, sizes["max_batch_start"]), sizes["max_batch_limit"])


def largest_batch(kit: Kit, sizes: dict, budget: float, gpu_flag: list[str]) -> dict:
    """The largest power-of-two batch of sdjax's step that fits: from `first_batch_to_try`, up
    by doubling while steps succeed, or down by halving while they fail, until the answer is
    bracketed, the limit, or the budget. Each try is bench_train's worker in a fresh process."""
    arch, limit = sizes["max_batch_arch"], sizes["max_batch_limit"]
    train = next((s for s in kit.record["steps"] if s["name"] == "train"), {})
    batch = first_batch_to_try(sizes, train.get("rows", []), kit.record.get("memory_bytes"))
    deadline, tries, outputs = time.monotonic() + budget, {}, []
    stopped_by = "limit"
    while 1 <= batch <= limit and batch not in tries:
        left = deadline - time.monotonic()
        if left < 5:
            stopped_by = "budget"
            break
        command = [sys.executable, "-m", "experiments.bench_train", *gpu_flag]
        command += [f"--train_worker=sdjax,{arch},{batch},0", "--steps=1"]
        command += [arg for arg in sizes.get("train_size", []) if "image_size" in arg]
        attempt = kit.run_step(f"max_batch {batch}", command, left)
        outputs.append(attempt["output"])
        out_of_memory = any(mark in attempt["output"] for mark in OUT_OF_MEMORY)
        tries[batch] = "out of memory" if out_of_memory else attempt["status"]
        if tries[batch] not in ("ok", "out of memory"):
            stopped_by = "budget" if tries[batch].startswith("stopped") else "failure (see the log)"
            break
        fits = tries[batch] == "ok"
        if fits and (2 * batch in tries or 2 * batch > limit):
            stopped_by = "bracketed" if 2 * batch in tries else "limit"
            break
        if not fits and batch // 2 in tries:
            stopped_by = "bracketed"
            break
        batch = 2 * batch if fits else batch // 2
    fitting = [b for b, status in tries.items() if status == "ok"]
    failing = [b for b, status in tries.items() if status == "out of memory"]
    row = {"arch": arch, "impl": "sdjax", "largest_fitting": max(fitting, default=0)}
    row["smallest_failing"] = min(failing, default=None)  # out of memory
    row |= {
        "stopped_by": stopped_by,
        "tries": [{"batch_size": b, "status": s} for b, s in tries.items()],
    }
    status = "ok" if fitting else "failed"
    return {"status": status, "rows": [row], "output": "\n".join(outputs)}


def suite_rows(profile_dir: Path) -> list[dict]:
    rows = []
    for path in sorted((profile_dir / "runs").rglob("*.json")):
        record = json.loads(path.read_text())
        scored_by = "classifier" if "classifier" in record else "linear_eval"
        rows.append(
            {
                "run": str(path.relative_to(profile_dir / "runs").with_suffix("")),
                "mAP": record[scored_by]["mAP"],
                "wall_seconds": record["wall_seconds"],
                "hardware": record["hardware"],
            }
        )
    return rows


def write_outputs(kit: Kit) -> None:
    """$OUT's four files, rewritten after every step so that a cut-off call still returns them."""
    kit.out_dir.mkdir(parents=True, exist_ok=True)
    record = kit.record | {"run_id": f"{kit.record['started']} {kit.record.get('hardware', '')}"}
    (kit.out_dir / "kit.json").write_text(json.dumps(record, indent=1) + "\n")
    (kit.out_dir / "kit.md").write_text(summary_markdown([record]))
    (kit.out_dir / "logs.txt").write_text(kit.log.getvalue()[-15 * MIB :])
    with tarfile.open(kit.out_dir / "outputs.tar.gz", "w:gz") as tar:
        tar.add(kit.work_dir / "outputs", arcname="outputs")


def run(args) -> dict:
    out_dir = Path(args.out_dir or os.environ.get("OUT") or KIT_DIR / "out")
    work_dir = Path(args.work_dir)
    shutil.rmtree(work_dir / "outputs", ignore_errors=True)
    kit = Kit(Path(args.kit_dir), out_dir, work_dir, args.budget_s)
    kit.describe_machine()
    gpu = kit.record["accelerator"] == "gpu" if args.sizes == "auto" else args.sizes == "gpu"
    kit.record["sizes"] = "gpu" if gpu else "tiny"
    steps = [(name, budget) for name, budget in STEPS if not args.only or name in args.only]
    budgets = {name: budget if gpu else TINY_BUDGET_S for name, budget in steps}
    measure(kit, GPU if gpu else TINY, budgets, gpu)
    kit.say(f"done; outputs in {out_dir}")
    write_outputs(kit)
    merge(out_dir, Path(args.results_dir))
    return kit.record


# --------------------------------------------------------------------------------------------
# merge (both): a run's $OUT into experiments/results/device
# --------------------------------------------------------------------------------------------

ROW_KEYS = {  # what makes two rows of a step the same measurement
    "loss_f32": ("precision", "n", "impl"),
    "loss_bf16": ("precision", "n", "impl"),
    "train": ("arch", "impl", "chunk_size"),
    "max_batch": ("arch", "impl"),
    "grad_cache": ("arch", "views", "chunk_size", "image_size"),
    "suite": ("run",),
}


def merge(out_dir: Path, results_dir: Path) -> Path:
    """Adds the run in `out_dir` to results_dir/device (replacing an earlier copy of the same
    run), its script outputs under device/<hardware>/<start>/, and the suite's new result files
    to results_dir/<profile>/runs/. Returns the summary's path."""
    record = json.loads((out_dir / "kit.json").read_text())
    device = results_dir / "device"
    device.mkdir(parents=True, exist_ok=True)
    ledger = device / "runs.json"
    runs = json.loads(ledger.read_text())["runs"] if ledger.exists() else []
    runs = [r for r in runs if r["run_id"] != record["run_id"]] + [record]
    runs.sort(key=lambda r: r["started"])
    ledger.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    stamp = record["started"].replace(":", "")
    outputs = device / slug(record.get("hardware", "unknown")) / stamp
    with tarfile.open(out_dir / "outputs.tar.gz") as tar:
        with tempfile.TemporaryDirectory() as scratch:
            tar.extractall(scratch, filter="data")
            shutil.rmtree(outputs, ignore_errors=True)
            suite = Path(scratch) / "outputs" / "suite"
            for profile in suite.glob("*"):
                for path in (profile / "runs").rglob("*.json"):
                    target = (
                        results_dir / profile.name / "runs" / path.relative_to(profile / "runs")
                    )
                    if not target.exists():  # a finished run's file is final
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, target)
            shutil.rmtree(suite, ignore_errors=True)
            shutil.copytree(Path(scratch) / "outputs", outputs)
    summary = device / "summary.md"
    summary.write_text(summary_markdown(runs))
    return summary


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text.split(",")[0]).strip("-").lower()


def newest_rows(runs: list[dict]) -> dict:
    """{hardware: {step: [rows]}}, the newest row of each measurement (ROW_KEYS) per hardware."""
    table: dict = {}
    for run in sorted(runs, key=lambda r: r["started"]):
        for step in run["steps"]:
            rows = table.setdefault(run.get("hardware", "unknown"), {}).setdefault(step["name"], {})
            for row in step.get("rows", []):
                key = tuple(row.get(k) for k in ROW_KEYS[step["name"]])
                rows[key] = row | {"started": run["started"]}
    return {
        hw: {s: list(rows.values()) for s, rows in steps.items()} for hw, steps in table.items()
    }


def summary_markdown(runs: list[dict]) -> str:
    """The runs, then per hardware the newest row of every measurement."""
    lines = [
        "# Device kit results",
        "",
        "Written by `experiments/device_kit.py`; see its docstring.",
        "",
    ]
    lines += [
        "| run started | hardware | sizes | jax | torch | steps: status (wall s) |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: r["started"], reverse=True):
        steps = "; ".join(f"{s['name']}: {s['status']} ({s['wall_s']:.0f})" for s in run["steps"])
        versions = run.get("versions", {})
        lines.append(
            f"| {run['started']} | {run.get('hardware', '?')} | {run.get('sizes', '?')} | "
            f"{versions.get('jax', '?')} | {versions.get('torch', 'absent')} | {steps} |"
        )
    for hardware, steps in newest_rows(runs).items():
        lines += ["", f"## {hardware}", ""]
        for name, rows in steps.items():
            if rows:
                lines += [f"### {name}", "", *row_table(name, rows), ""]
            if name == "train" and train_speedups(rows):
                ratios = ", ".join(f"{a} {r:.2f}" for a, r in train_speedups(rows).items())
                lines += [f"sdjax / torch.compile, samples per second: {ratios}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def row_table(name: str, rows: list[dict]) -> list[str]:
    def number(value, digits):
        return f"{value:.{digits}f}" if isinstance(value, int | float) else "–"

    if name.startswith("loss_"):
        head = (
            "| precision | N | impl | status | median fwd+bwd (s) | peak memory (MB) | GFLOP/s "
            "| run |"
        )
        body = [
            f"| {r['precision']} | {r['n']} | {r['impl']} | {r['status']} | "
            f"{number(r.get('median_s'), 4)} | {number(r.get('peak_memory_mb'), 0)} | "
            f"{number(r.get('gflops'), 1)} | {r['started']} |"
            for r in rows
        ]
    elif name in ("train", "grad_cache"):
        head = (
            "| network | impl | batch (x2 views) | chunk | status | samples/s | step (ms) | "
            "peak memory (MB) | MFU | run |"
        )
        body = [
            f"| {r['arch']} | {r['impl']} | {r['batch_size']} | {r.get('chunk_size', 0)} | "
            f"{r['status']} | {number(r.get('samples_per_s'), 1)} | "
            f"{number(1e3 * r['median_step_s'] if 'median_step_s' in r else None, 0)} | "
            f"{number(r.get('peak_memory_mb'), 0)} | "
            f"{number(100 * r['mfu'] if r.get('mfu') else None, 1)}{'%' if r.get('mfu') else ''} "
            f"| {r['started']} |"
            for r in rows
        ]
    elif name == "max_batch":
        head = (
            "| network | impl | largest batch that fit (x2 views) | smallest that failed | "
            "search stopped by | run |"
        )
        body = [
            f"| {r['arch']} | {r['impl']} | {r['largest_fitting']} | "
            f"{r.get('smallest_failing') or '–'} | {r['stopped_by']} | {r['started']} |"
            for r in rows
        ]
    else:
        head = "| run | mAP | wall (s) | hardware | kit run |"
        body = [
            f"| {r['run']} | {r['mAP']:.4f} | {r['wall_seconds']:.0f} | {r['hardware']} | "
            f"{r['started']} |"
            for r in rows
        ]
    return [head, "|" + "---|" * (head.count("|") - 1), *body]


# --------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="wheels and datasets into kit parts (here)")
    packing.add_argument("--kit_dir", default=str(KIT_DIR))
    packing.add_argument("--datasets", default=",".join(SUITE_DATASETS))
    packing.add_argument("--part_mib", type=float, default=None, help="default: 60 - the tree")
    running = commands.add_parser("run", help="install the parts and measure (there)")
    running.add_argument("--kit_dir", default=str(KIT_DIR))
    running.add_argument("--out_dir", default="", help="default: $OUT, else .kit/out")
    running.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "sdjax_kit"))
    running.add_argument("--results_dir", default=str(RESULTS))
    running.add_argument("--budget_s", type=float, default=480.0, help="all steps together")
    running.add_argument("--sizes", choices=("auto", "gpu", "tiny"), default="auto")
    running.add_argument("--only", type=lambda s: s.split(","), default=[], help="some steps")
    merging = commands.add_parser("merge", help="a run's returned $OUT into the results (here)")
    merging.add_argument("out_dir")
    merging.add_argument("--results_dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.command == "pack":
        datasets = [d for d in args.datasets.split(",") if d]
        parts = pack(Path(args.kit_dir), datasets, args.part_mib)
        for part in parts:
            size = sum(f.stat().st_size for f in part.iterdir()) / MIB
            print(f"{part}: {size:.1f} MiB, {len(list(part.iterdir())) - 1} files")
        print(f"working tree that travels: {traveling_tree_mib():.1f} MiB. On the device:")
        for call in device_commands(parts):
            print(f"  run {json.dumps(call)}")
    elif args.command == "run":
        run(args)
    else:
        print(f"wrote {merge(Path(args.out_dir), Path(args.results_dir))}")


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: import from the repo root
        sys.path.insert(0, str(REPOSITORY))
    main()
