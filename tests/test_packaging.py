"""The sdist and the wheel build, and the wheel works where users install it: in fresh virtual
environments, from a directory outside the clone. The core alone (jax and numpy) on the newest
pinned JAX and on the oldest that pyproject.toml promises; the training extra trains with a
config file that loads the config files it builds on.

Slow (fresh venvs, pip installs; pip's cache and the local wheel index keep them off the
network where they can; the wheel's dependencies are installed once per set, see `wheel_venv`):
deselect with -m "not slow".
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import sdjax

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REQUIREMENTS = ROOT / "requirements.txt"  # the pinned stack: constraints for every install

# The extras of a training install ("train,prepare" if dataset preparation becomes its own).
TRAIN_EXTRAS = "train"

# The core's promise, `jax>=0.10.2`, at both ends: the oldest JAX with the oldest numpy it
# allows (on Python 3.11: jax 0.11 and newer need 3.12), and the pinned stack's JAX.
OLDEST_CORE = ("3.11", ["jax==0.10.2", "jaxlib==0.10.2", "numpy==2.0.2"])
NEWEST_CORE = ("3.12", ["-c", str(REQUIREMENTS)])
# What a core install may bring: jax's own dependencies; besides them the venv holds what
# `python -m venv` seeds it with (setuptools too before Python 3.12) and the test runner.
CORE_DISTRIBUTIONS = {"sdjax", "jax", "jaxlib", "numpy", "ml-dtypes", "opt-einsum", "scipy"}
VENV_AND_TEST_RUNNER = {
    "pip",
    "setuptools",
    "pytest",
    "iniconfig",
    "packaging",
    "pluggy",
    "pygments",
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python(version: str) -> str:
    """This machine's python{version}: on PATH, or pyenv's (the Makefile finds 3.12 alike)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python3")))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", ""]).returncode == 0:
            return candidate
    pytest.fail(f"Python {version} not found (PATH, ~/.pyenv): the core's tests need it.")


def outside_env() -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing into the clone, no venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.pop("TFDS_DATA_DIR", None)
    return env


def run(command, cwd, timeout=900):
    result = subprocess.run(
        command, cwd=cwd, env=outside_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def fresh_venv(path: Path, python_version: str, *requirements: str) -> Path:
    """A new virtual environment with `requirements` pip-installed; returns its python."""
    run([python(python_version), "-m", "venv", str(path)], cwd=path.parent)
    venv_python = path / "bin" / "python"
    # --no-compile: byte-compiling TensorFlow's thousands of files would be most of the install.
    pip = [
        str(venv_python),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--no-compile",
    ]
    run([*pip, *requirements], cwd=path.parent)
    return venv_python


CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdjax"


def wheel_venv(path: Path, python_version: str, wheel: Path, extras: str, *pins: str) -> Path:
    """A new virtual environment at `path` holding `wheel` (with `extras`) and what pip resolves
    for it under `pins`, as `fresh_venv(path, python_version, "wheel[extras]", *pins)` makes it;
    returns its python.

    The dependencies are installed once per (Python, the wheel's Requires-Dist, `extras`, the
    pins and the files they name) into a cached environment, which each call hard-links into
    `path` (copies across file systems) before it installs the wheel itself there. What a new
    install brings is what the cached one brought: a changed dependency or pin makes a new one.
    """
    with zipfile.ZipFile(wheel) as archive:
        metadata = Parser().parsestr(
            archive.read(f"sdjax-{sdjax.__version__}.dist-info/METADATA").decode()
        )
    interpreter = python(python_version)
    key_parts = [
        run([interpreter, "-c", "import sys; print(sys.version)"], ROOT).stdout,
        "\n".join(sorted(metadata.get_all("Requires-Dist") or [])),
        metadata["Requires-Python"],
        extras,
        *(Path(pin).read_text() if os.path.isfile(pin) else pin for pin in pins),
    ]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:12]
    cached = CACHE / f"wheel-venv-{python_version}-{key}"
    if not (cached / "complete").exists():
        building = cached.with_name(f"{cached.name}.{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        requirement = f"{wheel}[{extras}]" if extras else str(wheel)
        building_python = fresh_venv(building, python_version, requirement, *pins)
        run([str(building_python), "-m", "pip", "uninstall", "-q", "-y", "sdjax"], building)
        (building / "complete").touch()
        try:
            building.rename(cached)  # whole or not at all
        except OSError:  # a concurrent maker's, as good
            shutil.rmtree(building)
    shutil.copytree(cached, path, symlinks=True, copy_function=link_or_copy)
    (path / "complete").unlink()
    venv_python = path / "bin" / "python"
    pip = [str(venv_python), "-m", "pip", "install", "-q", "--no-compile", "--no-deps"]
    run([*pip, str(wheel)], path)
    return venv_python


def link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def installed(venv_python: Path) -> set[str]:
    listing = run([str(venv_python), "-m", "pip", "list", "--format=json"], cwd=venv_python.parent)
    return {normalized(entry["name"]) for entry in json.loads(listing.stdout)}


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(sdist, wheel) built by `python -m build` from a copy of the checkout's files.

    --no-isolation: the build backend is the one in this venv (pinned in requirements.txt),
    so the build needs no network. The wheel is built from the sdist, as PyPI users get it.
    """
    base = tmp_path_factory.mktemp("dists")
    source = base / "source"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is listed too
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(base / "dist")], source)
    version = sdjax.__version__
    sdist = base / "dist" / f"sdjax-{version}.tar.gz"
    wheel = base / "dist" / f"sdjax-{version}-py3-none-any.whl"
    assert sdist.exists() and wheel.exists(), sorted(os.listdir(base / "dist"))
    return sdist, wheel


def test_the_wheel_holds_every_module_and_the_metadata_of_pyproject(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(
            archive.read(f"sdjax-{sdjax.__version__}.dist-info/METADATA").decode()
        )
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "sdjax").rglob("*.py")}
    assert modules <= names, modules - names
    assert not any(name.startswith(("tests/", "configs/", "experiments/")) for name in names)
    assert metadata["Version"] == sdjax.__version__
    assert metadata["Requires-Python"] == PYPROJECT["project"]["requires-python"]
    requires = metadata.get_all("Requires-Dist")
    core = sorted(r for r in requires if "extra ==" not in r)
    assert core == sorted(PYPROJECT["project"]["dependencies"])
    for extra in TRAIN_EXTRAS.split(","):
        in_wheel = sorted(r.split(";")[0].strip() for r in requires if f'extra == "{extra}"' in r)
        assert in_wheel == sorted(PYPROJECT["project"]["optional-dependencies"][extra])
    train_requires = {normalized(re.split(r"[=<>!~ ]", r)[0]) for r in requires if "train" in r}
    assert "importlib-resources" in train_requires  # tfds builds datasets with it


CORE_CHECK = """
import doctest, importlib, importlib.metadata, pkgutil, sys
import jax
import sdjax, sdjax.losses
assert sdjax.__file__.startswith(sys.prefix), sdjax.__file__  # the wheel, not the clone
assert importlib.metadata.version("sdjax") == sdjax.__version__
assert not {"flax", "optax", "tensorflow", "ml_collections"} & set(sys.modules)
# The examples live in the package's modules, where the public functions are defined.
names = [module.name for module in pkgutil.iter_modules(sdjax.losses.__path__)]
modules = [importlib.import_module(f"sdjax.losses.{name}") for name in names]
results = [doctest.testmod(module) for module in modules]
attempted, failed = sum(r.attempted for r in results), sum(r.failed for r in results)
assert attempted >= 5 and failed == 0, results
print(jax.__version__)
"""


@pytest.mark.parametrize(
    ("python_version", "pins"), [NEWEST_CORE, OLDEST_CORE], ids=["newest_jax", "oldest_jax"]
)
def test_the_core_wheel_alone_passes_the_loss_tests(dists, tmp_path, python_version, pins):
    """The wheel with its core dependencies only, and pytest: the doctests run from a directory
    outside the clone; on the oldest promised jax, the tests of tests/test_losses.py that check
    values against the float64 oracle (every `positives`, label format, gradient) then run
    against the installed package. The main suite runs the whole file on the newest jax; the
    rest of it (errors, padding, blockwise against dense, jit/vmap compositions) would add
    about 66 s of CPU time here, outside the CI budget."""
    _, wheel = dists
    venv_python = wheel_venv(tmp_path / "venv", python_version, wheel, "", "pytest==9.2.0", *pins)
    extra = installed(venv_python) - CORE_DISTRIBUTIONS - VENV_AND_TEST_RUNNER
    assert not extra, f"the core install brought {sorted(extra)}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jax_version = run([str(venv_python), "-c", CORE_CHECK], elsewhere).stdout.strip()
    expected = pins[0].split("==")[1] if pins[0].startswith("jax==") else pinned("jax")
    assert jax_version == expected

    # rootdir = the clone (its pytest settings and conftest.py); `sdjax` is the installed one:
    # pytest puts tests/ (no __init__.py) on sys.path, not the clone's root, and the working
    # directory is outside the clone.
    if (python_version, pins) == NEWEST_CORE:
        return  # the main suite runs tests/test_losses.py on this very jax already
    pytest_command = [str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    tests = run(
        [*pytest_command, str(ROOT / "tests" / "test_losses.py"), "-k", "oracle"], elsewhere
    )
    assert re.search(r"[1-9]\d+ passed", tests.stdout) and " failed" not in tests.stdout


def pinned(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)", REQUIREMENTS.read_text(), re.M)
    return match.group(1)


TRAIN_CONFIG = '''
"""A user's config: the tiny Yeast run with another loss, built on the config next to it."""
from pathlib import Path

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file(Path(__file__).with_name("yeast.py"), profile)
    config.loss.positives = "any"
    return config
'''


def test_the_wheel_with_the_train_extra_trains_from_outside_the_clone(dists, tmp_path):
    """`pip install "sdjax[train]"`, then `python -m sdjax.main` on a config file that loads
    configs/yeast.py, which loads configs/default.py, all copied to a directory of the user's;
    the dataset is built into an empty data dir (tfds needs importlib_resources for that)."""
    _, wheel = dists
    venv_python = wheel_venv(
        tmp_path / "venv", "3.12", wheel, TRAIN_EXTRAS, "-c", str(REQUIREMENTS)
    )
    assert "importlib-resources" in installed(venv_python)

    user = tmp_path / "user"
    (user / "my_configs").mkdir(parents=True)
    for name in ("default.py", "yeast.py"):
        shutil.copy(ROOT / "configs" / name, user / "my_configs" / name)
    (user / "my_configs" / "my_yeast.py").write_text(TRAIN_CONFIG)
    data_dir = tmp_path / "tensorflow_datasets"
    command = [
        str(venv_python),
        "-m",
        "sdjax.main",
        "--config",
        "my_configs/my_yeast.py:tiny",
        "--workdir",
        "run",
        "--config.num_train_steps=8",
        f"--config.dataset.data_dir={data_dir}",
    ]
    run(command, user)

    results = json.loads((user / "run" / "results.json").read_text())
    config = results["config"]
    assert config["loss"]["positives"] == "any"  # my_yeast.py
    assert config["dataset"]["name"] == "yeast"  # yeast.py
    assert config["model"]["encoder"]["hidden_sizes"] == [32]  # yeast.py's tiny profile
    assert config["optimizer"]["warmup_steps"] == 2  # the shared tiny profile of config_lib
    assert config["num_train_steps"] == 8  # the command line
    for probe in ("linear_eval", "random_init"):
        assert 0.0 < results[probe]["mAP"] <= 1.0, results[probe]
    assert any(data_dir.rglob("*.array_record*")), "the dataset was not built into data_dir"
