# The two commands of the README. Each installs what it needs first (a no-op once installed).
# torch is installed on its own first: with no torch present, an unpinned `torch` pulls a multi-GB CUDA build;
# 2.13.0 is the tested version (a CPU wheel on CPU-only machines set up like ours). GPU users: install your own torch
# build first, and this step leaves it alone.
PYTHON ?= python

.PHONY: setup setup-dev demo test bench

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	@$(PYTHON) -m pip install -q -r requirements.txt

setup-dev: setup
	@$(PYTHON) -m pip install -q -r requirements-dev.txt

demo: setup
	$(PYTHON) demo.py

test: setup-dev
	$(PYTHON) -m pytest

bench: setup-dev
	$(PYTHON) bench.py
