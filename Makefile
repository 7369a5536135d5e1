# `make test` and `make demo` each do all the set-up from a fresh clone.
# jax 0.11 and newer need Python >= 3.12; pyenv's 3.12 is on this project's machines.
PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do "$$p" -c '' 2>/dev/null && { command -v "$$p"; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default

.PHONY: test lint format docs demo bench clean

$(STAMP): requirements.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.12 not found: make PYTHON=/path/to/python3.12" >&2; exit 2; }
	$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
		|| { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict sdjax/losses.py

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -n 2 -q

# The documentation site, into docs/_build/html: every page re-read (-E), every tutorial run,
# every warning an error.
docs: $(STAMP)
	$(PY) -m sphinx -E -W --keep-going -b html docs docs/_build/html

demo: $(STAMP)
	$(PY) -m sdjax.main --config configs/default.py --workdir $(WORKDIR)

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m experiments.bench_loss
	$(PY) -m experiments.bench_train

clean:
	rm -rf $(VENV) workdirs docs/_build
