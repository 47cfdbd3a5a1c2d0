# ab-accel developer tasks (GNU make). `make` alone lists the targets.

VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP = $(VENV)/.installed

# Tests run offline, on CPU, one BLAS thread per process (many gloo processes share few cores).
# The venv's bin comes first on PATH: DeepSpeed compiles a small CPU op with `ninja`, and a
# different ninja on PATH from one run to the next makes it rebuild (minutes) every time.
TEST_ENV = OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false PATH="$(abspath $(VENV))/bin:$$PATH"

# demo / bench scripts run with the venv first on PATH (python, accelerate, deepspeed, torchrun).
IN_VENV = $(MAKE) --no-print-directory $(STAMP) && PATH="$(abspath $(VENV))/bin:$$PATH"

# Only the source folders that exist yet.
LINT_PATHS = $(wildcard ab_accel tests recipes benchmarks)

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint format demo bench bench-quick clean

help: ## list the targets
	@echo "usage: make <target>   (VENV=$(VENV))"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

# The venv is rebuilt only when the dependencies change. The editable install uses the venv's
# own setuptools (pinned in the lock: no build-time download) and compat mode (a .pth pointing
# at the checkout), so packages that appear under ab_accel/ later are importable without a
# reinstall.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements/lock.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	touch $@

install: $(STAMP) ## create the venv from requirements/lock.txt and install ab_accel editable

test: $(STAMP) ## run the fast tests (not the ones marked slow); extra flags: PYTEST_ARGS=...
	$(TEST_ENV) $(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: $(STAMP) ## run every test, slow multi-process runs included
	$(TEST_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check of the source folders that exist
	$(VENV)/bin/ruff check $(LINT_PATHS)

format: $(STAMP) ## sort imports and reformat with ruff
	$(VENV)/bin/ruff check --select I --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

demo: ## run the end-to-end demo (recipes/demo.sh)
	@if [ -f recipes/demo.sh ]; then \
		$(IN_VENV) bash recipes/demo.sh; \
	else echo "make demo: not yet: the recipes land with issue 3"; fi

bench: ## run the full benchmark (benchmarks/run.sh full)
	@if [ -f benchmarks/run.sh ]; then \
		$(IN_VENV) bash benchmarks/run.sh full; \
	else echo "make bench: not yet: the benchmarks have not landed"; fi

bench-quick: ## run a short benchmark (benchmarks/run.sh quick)
	@if [ -f benchmarks/run.sh ]; then \
		$(IN_VENV) bash benchmarks/run.sh quick; \
	else echo "make bench-quick: not yet: the benchmarks have not landed"; fi

clean: ## remove caches and build outputs (keeps the venv; rm -rf .venv drops it)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
