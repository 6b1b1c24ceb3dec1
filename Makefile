# Two commands on a fresh machine:  make demo  (install + the embedded continued-pretraining run)
#                                   make test  (install + the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH ?= torch==2.13.0

.PHONY: demo test install lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)   # first, so no CUDA build is pulled in by a bare `torch` requirement
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/igea train configs/demo.yaml --overwrite

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
