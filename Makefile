# The README's two commands: `make demo` and `make test`. Everything else is plumbing for them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast test-reliability bench lint system-deps venv clean

# System packages (Debian): the dataset, sshd for remote-train tests, dockerd for image tests,
# Postgres 15 for the tracking node, Java 17 for TorchServe. Skipped when already present.
system-deps:
	@bash scripts/system-deps.sh

$(STAMP): pyproject.toml scripts/system-deps.sh
	@bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel
	# torch first and exactly pinned: otherwise a dependency pulls the CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps torchvision==0.28.0
	$(PIP) install -q -e ".[all,dev]"
	# Triton's server binary (the second engine); --no-deps: see the `serve` extra in pyproject.toml.
	$(PIP) install -q --no-deps nvidia-pytriton==0.7.0
	# ...and numpy 1 in a venv of its own for the Python backend's stub (serving/triton.py: stub_python).
	$(PY) -m venv --without-pip $(VENV)/triton-python-backend
	$(PIP) install -q --no-deps --upgrade --target \
	  "$$($(VENV)/triton-python-backend/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" numpy==1.26.4
	touch $(STAMP)

venv: $(STAMP)

# FULL=1: tracking node on Postgres + GCS emulator + auth; KEEP=1: leave the servers running.
demo: $(STAMP)
	$(VENV)/bin/flywheel demo $(if $(filter 1 true yes,$(FULL)),--full) $(if $(filter 1 true yes,$(KEEP)),--keep)

test: $(STAMP)
	$(PY) -m pytest -q -m "not reliability" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration and not reliability" tests

test-reliability: $(STAMP)
	$(PY) -m pytest -q -m reliability tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) mlruns mlflow.db .flywheel
