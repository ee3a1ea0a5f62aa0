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

# llama-cpp-python (deepfusion-edge[gguf]) builds from source, minutes on 2 cores; pip caches the built
# wheel, so a second install on the same machine does not recompile. GGML_NATIVE=OFF: a portable build.
$(STAMP): $(REQS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
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
	$(VENV)/bin/mypy shared/src edge/src cloud/src

bench: setup system-deps
	$(PY) benchmarks/bench_packets.py
	$(PY) benchmarks/bench_edge.py --threads 1
	$(PY) benchmarks/bench_trainer.py

clean:
	rm -rf $(VENV) dist build .pytest_cache .hypothesis results
