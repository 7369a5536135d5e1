# `make test` and `make demo` each do all the set-up from a fresh clone.
# jax 0.11 and newer need Python >= 3.12; pyenv's 3.12 is on this project's machines.
PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do "$$p" -c '' 2>/dev/null && { command -v "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The PyTorch benchmark peer (torch==2.13.0, the local CPU wheel) exists for Python 3.11 only:
# the bench scripts run their PyTorch workers in this venv (experiments/bench_loss.py).
TORCH_PYTHON ?= $(shell for p in python3.11 $(HOME)/.pyenv/versions/3.11*/bin/python3.11; do "$$p" -c '' 2>/dev/null && { command -v "$$p"; break; }; done)
TORCH_VENV := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed
WORKDIR ?= workdirs/default

.PHONY: test test-fast lint format docs demo bench clean

# --no-compile: Python compiles the modules a run imports when it first imports them, not all
# of TensorFlow's at install time (a fresh install: 55 s instead of 93 s on the 2-core CPU).
$(STAMP): requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: make PYTHON=/path/to/python3.12" >&2; exit 2; }
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --no-compile --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Two workers; each test file runs whole on one (a file's shared fixtures, a trained run or the
# built wheel, are made once), the next file going to the first worker free, in the order
# tests/conftest.py gives them: the longest first.
# --durations: the slowest tests in every log, to keep CI within its budget (~10 minutes).
PYTEST := $(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder -q --durations=25

test: lint
	$(PYTEST)

# Without the tests marked slow (venvs, wheels, the docs site, the device kit, processes,
# compiled training steps and multi-device programs): about 2 minutes, for iterating.
# `make test` runs everything.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The documentation site, into docs/_build/html: every page re-read (-E), every tutorial run,
# every warning an error.
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -b html docs docs/_build/html

demo: $(STAMP)
	$(PY) -m sdjax.main --config configs/default.py --workdir $(WORKDIR)

$(TORCH_STAMP):
	@test -n "$(TORCH_PYTHON)" || { echo "Python 3.11 not found: make TORCH_PYTHON=/path/to/python3.11" >&2; exit 2; }
	rm -rf $(TORCH_VENV) && $(TORCH_PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 numpy==2.4.6 absl-py==2.5.1
	touch $(TORCH_STAMP)

bench: $(STAMP) $(TORCH_STAMP)
	$(PY) -m experiments.bench_loss
	$(PY) -m experiments.bench_train --chunk_size=16 --chunk_counts=2,4,8,16,32,64 --rounds=3 --steps=8 \
		--impls=sdjax,torch_compile,torch_eager

clean:
	rm -rf $(VENV) $(TORCH_VENV) workdirs docs/_build
