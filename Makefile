PYTHON ?= python3

.PHONY: install demo test test-gpu test-oldest bench

# Installs the CPU build of torch that lies on this machine's disk (an unpinned torch pulls CUDA).
install:
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -m pip install -q torch
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -q

# The suite against the oldest supported transformers (5.17), in its own virtual environment.
OLDEST_VENV ?= .venv-oldest
test-oldest:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q torch==2.13.0 || $(OLDEST_VENV)/bin/python -m pip install -q torch
	$(OLDEST_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==5.17.0" "huggingface_hub<2"
	$(OLDEST_VENV)/bin/python -m pytest -q

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

bench:
	$(PYTHON) benchmarks/bench_training.py
