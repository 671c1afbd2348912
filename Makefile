# sad-pipe: `make all` runs the demo end to end, `make test` runs the suite. Both install first.
#
# Variables: PYTHON (the interpreter that creates .venv), TORCH_SPEC (the torch to install first;
# e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" on a GPU box).

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# An active virtualenv is used as is; otherwise one is created in .venv.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sad-pipe-installed
SAD := $(PY) -m sad_pipe.cli

.PHONY: install test test-slow all demo compare compare-hidden bench gpu-check clean clean-demo help
.DEFAULT_GOAL := help

help:
	@echo "make all        the whole pipeline on the embedded demo (no download), report in runs/demo/report.md"
	@echo "make test       the test suite (what CI runs)"
	@echo "make compare    the demo's method comparison over SEEDS seeds (default 3)"
	@echo "make compare-hidden  the curriculum student from each hidden-state storage mode vs bf16 states, SEEDS seeds"
	@echo "make bench      performance benchmarks -> bench/results.json, bench/results.md"
	@echo "make gpu-check  on a CUDA machine: the benchmarks a GPU must measure -> bench/gpu-results.md"
	@echo "make clean      remove the virtualenv, runs/ and build leftovers"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q --runslow

include demo.mk

# e.g. make bench BENCH_ARGS="--device cuda" or BENCH_ARGS="--only kd-loss"
BENCH_ARGS ?=
bench: install
	$(SAD) bench --output bench $(BENCH_ARGS)

# cache-teacher ÷ bare forward, online KD vs the cache, the fp16 and bf16 paths, on the GPU (under 10 min);
# GPU_CHECK_ARGS="--device cpu --quick" tries it without one.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(SAD) bench --gpu-check --output bench $(GPU_CHECK_ARGS)

clean: clean-demo
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
