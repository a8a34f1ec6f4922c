PYTHON ?= python3

.PHONY: install demo test test-gpu bench

# Installs the CPU build of torch that lies on this machine's disk (an unpinned torch pulls CUDA).
install:
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -m pip install -q torch
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) examples/demo.py

test: install
	$(PYTHON) -m pytest -q tests

test-gpu:
	$(PYTHON) -m pytest -q -m gpu tests

bench:
	$(PYTHON) benchmarks/bench_training.py
