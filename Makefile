# Two commands on a fresh machine:  make demo  (install + the embedded continued-pretraining run)
#                                   make test  (install with the dev extras + the test suite)
# `make test-fast` skips the multi-second tests; `make lint` runs ruff.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast install lint clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)   # first, so no CUDA build is pulled in by a bare `torch` requirement
	touch $@

$(VENV)/.demo: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[plots]"   # igea and matplotlib (curves.png), nothing else
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.demo

demo: $(VENV)/.demo
	$(VENV)/bin/igea train configs/demo.yaml --overwrite

test: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow"

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
