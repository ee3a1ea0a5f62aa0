# DeepFusion developer entry points. A newcomer needs only two:
#   make demo   set everything up and run a whole federation on this machine
#   make test   set everything up and run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.deepfusion-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
REQS := packaging/requirements-dev.txt packaging/constraints.txt shared/pyproject.toml edge/pyproject.toml cloud/pyproject.toml

.PHONY: setup system-deps demo test lint bench clean

setup: $(STAMP)

$(STAMP): $(REQS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c packaging/constraints.txt -r packaging/requirements-dev.txt
	touch $(STAMP)

# The broker the tests and the demo start on a free loopback port.
system-deps:
	@command -v mosquitto >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients; }

demo: setup system-deps
	$(VENV)/bin/deepfusion-cloud simulate

test: setup system-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check shared edge cloud tests benchmarks
	$(VENV)/bin/ruff format --check shared edge cloud tests benchmarks

bench: setup system-deps
	$(PY) benchmarks/bench_packets.py

clean:
	rm -rf $(VENV) dist build .pytest_cache .hypothesis results
