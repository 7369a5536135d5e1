# `make test` and `make demo` each do all the set-up from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default

.PHONY: test lint format demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -n 2 -q

demo: $(STAMP)
	$(PY) -m sdjax.main --config configs/default.py --workdir $(WORKDIR)

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m experiments.bench_loss
	$(PY) -m experiments.bench_train

clean:
	rm -rf $(VENV) workdirs
