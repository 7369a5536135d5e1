"""The device kit's CPU rehearsal: packed here, then run end to end at tiny sizes in a virtual
environment of the accelerator image's packages (experiments/device_image.txt: CPU builds,
jax 0.11.2, no TensorFlow, no PyTorch) plus the kit's parts, as on the device."""

import copy
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tiny_run import REPO

from experiments import device_kit

IMAGE_PACKAGES = REPO / "experiments" / "device_image.txt"


@pytest.fixture(scope="module")
def image_python():
    """The Python of a virtual environment holding exactly device_image.txt. It is made once per
    package list (pip's cache makes that quick after the first time) and reused: the kit never
    installs into it (its wheels go to a folder of their own)."""
    key = hashlib.sha256(IMAGE_PACKAGES.read_bytes() + sys.version.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdjax"
    root = cache / f"device-image-venv-{key}"
    if not (root / "complete").exists():
        building = cache / f"device-image-venv-{key}.{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)  # this venv's own interpreter
        subprocess.run([base, "-m", "venv", str(building)], check=True)
        pip = [str(building / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--disable-pip-version-check", "-r", str(IMAGE_PACKAGES)], check=True)
        (building / "complete").touch()
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)  # whole or not at all: a concurrent maker's copy is as good
    return root / "bin" / "python"


@pytest.fixture(scope="module")
def rehearsal(image_python, tmp_path_factory):
    """`pack` here, then `run` with the image's Python: (its $OUT, results dir, kit.json)."""
    tmp = tmp_path_factory.mktemp("kit")
    kit, out, results = tmp / "kit", tmp / "out", tmp / "results"
    subprocess.run(
        [sys.executable, "-m", "experiments.device_kit", "pack", f"--kit_dir={kit}"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    arguments = [f"--kit_dir={kit}", f"--out_dir={out}", f"--results_dir={results}"]
    arguments.append(f"--work_dir={tmp / 'work'}")
    done = subprocess.run(
        [str(image_python), "experiments/device_kit.py", "run", *arguments],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, results, json.loads((out / "kit.json").read_text())


@pytest.mark.slow
def test_the_environment_is_the_images(image_python):
    probe = (
        "import importlib.util as u, jax; print(u.find_spec('tensorflow'), u.find_spec('torch'), "
    )
    done = subprocess.run(
        [str(image_python), "-c", probe + "jax.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.stdout.split() == ["None", "None", "0.11.2"]
    assert importlib.util.find_spec("tensorflow") is not None  # here, unlike there


@pytest.mark.slow
def test_every_step_runs_in_order_on_the_images_packages(rehearsal):
    out, _, record = rehearsal
    assert sorted(p.name for p in out.iterdir()) == [
        "kit.json",
        "kit.md",
        "logs.txt",
        "outputs.tar.gz",
    ]
    assert record["sizes"] == "tiny" and record["hardware"].startswith("cpu (")
    assert record["versions"]["jax"] == "0.11.2" and "torch" not in record["versions"]
    assert record["training_stack"] == "imports"
    steps = {step["name"]: step for step in record["steps"]}
    assert list(steps) == [name for name, _ in device_kit.STEPS]
    for name, step in steps.items():
        expected = device_kit.SUITE_FIRST_RUN if name == "suite" else "ok"
        assert step["status"] == expected, (name, step["output_tail"])

    for name, precision in (("loss_f32", "default"), ("loss_bf16", "bfloat16")):
        rows = {row["impl"]: row for row in steps[name]["rows"]}
        assert rows["sdjax"]["status"] == "ok" and rows["sdjax"]["precision"] == precision
        assert rows["sdjax"]["n"] == 256 and rows["sdjax"]["median_s"] > 0
        assert rows["torch_compile"]["status"] == "skipped (torch not installed)"

    train = {row["impl"]: row for row in steps["train"]["rows"]}
    assert train["sdjax"]["status"] == "ok" and train["sdjax"]["batch_size"] == 4
    assert all(math.isfinite(loss) for loss in train["sdjax"]["losses"])
    assert train["torch_compile"]["status"] == "skipped (torch not installed)"
    assert steps["train"]["speedups"] == {}  # no PyTorch row to divide by

    (largest,) = steps["max_batch"]["rows"]
    assert (largest["largest_fitting"], largest["stopped_by"]) == (4, "limit")
    (cached,) = steps["grad_cache"]["rows"]
    assert (cached["views"], cached["chunk_size"], cached["image_size"]) == (32, 8, 32)
    assert all(math.isfinite(loss) for loss in cached["losses"])

    with tarfile.open(out / "outputs.tar.gz") as tar:
        names = tar.getnames()
    assert "outputs/loss_bf16/bench_loss_bfloat16.md" in names
    assert "outputs/train/bench_train.json" in names


@pytest.mark.slow
def test_the_suite_keeps_each_finished_run(rehearsal):
    _, results, record = rehearsal
    (suite,) = [step for step in record["steps"] if step["name"] == "suite"]
    assert suite["rows"], suite["output_tail"]  # the first run finished (a second may have)
    for row in suite["rows"]:
        stored = json.loads((results / "quick" / "runs" / f"{row['run']}.json").read_text())
        assert stored["linear_eval"]["mAP"] == row["mAP"] and 0 < row["mAP"] < 1
        assert stored["hardware"] == record["hardware"]


@pytest.mark.slow
def test_merging_a_run_again_replaces_it_and_another_run_is_added(rehearsal, tmp_path):
    out, _, record = rehearsal
    results = tmp_path / "results"
    device_kit.merge(out, results)
    device_kit.merge(out, results)  # the same run twice: one entry
    runs = json.loads((results / "device" / "runs.json").read_text())["runs"]
    assert [run["run_id"] for run in runs] == [record["run_id"]]

    later = tmp_path / "later"
    shutil.copytree(out, later)
    rerun = copy.deepcopy(record)
    rerun["started"] = "9999-01-01T00:00:00Z"
    rerun["run_id"] = f"{rerun['started']} {rerun['hardware']}"
    rerun["steps"] = [step for step in rerun["steps"] if step["name"] == "loss_f32"]
    rerun["steps"][0]["rows"][0]["median_s"] = 123.0
    (later / "kit.json").write_text(json.dumps(rerun))
    summary = device_kit.merge(later, results).read_text()
    runs = json.loads((results / "device" / "runs.json").read_text())["runs"]
    assert [run["started"] for run in runs] == [record["started"], rerun["started"]]
    newest = device_kit.newest_rows(runs)[record["hardware"]]
    assert newest["loss_f32"][0]["median_s"] == 123.0  # the later run's row
    assert newest["loss_f32"][0]["started"] == rerun["started"]
    assert newest["train"] == [  # kept from the first run, which the later one did not redo
        row | {"started": record["started"]} for row in record["steps"][2]["rows"]
    ]
    assert summary.count(f"| {rerun['started']} |") >= 2  # in the runs table and a row
    assert (results / "device" / device_kit.slug(record["hardware"])).is_dir()


class FakeKit:
    """Runs no process: a bench_train worker "fits" up to `capacity` examples."""

    def __init__(self, capacity, train_rows=(), memory_bytes=None):
        self.capacity = capacity
        self.record = {"steps": [{"name": "train", "rows": list(train_rows)}]}
        self.record["memory_bytes"] = memory_bytes

    def run_step(self, name, command, budget_s):
        (worker,) = [arg for arg in command if arg.startswith("--train_worker=")]
        batch = int(worker.split(",")[2])  # --train_worker=sdjax,ARCH,BATCH,CHUNK
        if batch <= self.capacity:
            return {"status": "ok", "output": "{}"}
        return {"status": "failed (exit 1)", "output": "RESOURCE_EXHAUSTED: Out of memory"}


@pytest.mark.parametrize(
    ("capacity", "memory_gib", "largest", "failing", "tried"),
    [
        (700, 72, 512, 1024, [512, 1024]),  # 80 MiB an example: 921 predicted, 512 first
        (300, 72, 256, 512, [512, 256]),  # the prediction too high: down by halving
        (3000, None, 2048, 4096, [512, 1024, 2048, 4096]),  # no memory figure: from the start
    ],
)
def test_the_largest_batch_search_brackets_the_answer(
    capacity, memory_gib, largest, failing, tried
):
    measured = {"impl": "sdjax", "arch": "resnet50", "status": "ok", "batch_size": 256}
    measured |= {"chunk_size": 0, "peak_memory_mb": 256 * 80}
    memory = memory_gib and memory_gib * 2**30
    kit = FakeKit(capacity, [measured], memory)
    (row,) = device_kit.largest_batch(kit, device_kit.GPU, 600, ["--gpu"])["rows"]
    assert (row["largest_fitting"], row["smallest_failing"]) == (largest, failing)
    assert [t["batch_size"] for t in row["tries"]] == tried and row["stopped_by"] == "bracketed"


def test_the_summary_gives_sdjax_against_torch_compile():
    def row(impl, samples_per_s):
        measured = {"arch": "resnet50", "impl": impl, "status": "ok", "batch_size": 256}
        measured |= {"chunk_size": 0, "samples_per_s": samples_per_s}
        return measured | {"median_step_s": 256 / samples_per_s, "peak_memory_mb": 1000.0}

    rows = [row("sdjax", 1500.0), row("torch_compile", 1200.0)]
    run = {"started": "2027-01-01T00:00:00Z", "hardware": "NVIDIA H100 80GB HBM3, 16 host cores"}
    run["steps"] = [{"name": "train", "status": "ok", "wall_s": 60.0, "rows": rows}]
    text = device_kit.summary_markdown([run])
    assert "## NVIDIA H100 80GB HBM3, 16 host cores" in text
    assert "sdjax / torch.compile, samples per second: resnet50 1.25." in text
    assert "| resnet50 | sdjax | 256 | 0 | ok | 1500.0 | 171 | 1000 | – |" in text
