# The README's two commands: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xai-installed

.PHONY: install demo test test-all stress bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xai run recipes/quickstart.yaml

test: $(STAMP)
	$(VENV)/bin/pytest

test-all: $(STAMP)  # also the slow extra-exporter parity cases
	$(VENV)/bin/pytest -m ""

stress: $(STAMP)  # fuzzed images and recipes, kill-and-rerun trials; not part of `make test`
	$(PY) -m stress.run $(STRESS_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_explain.py

clean:
	rm -rf $(VENV) xai-out demo-out .pytest_cache
