# ab-accel developer tasks (GNU make). `make` alone lists the targets.

VENV ?= .venv
PYTHON ?= python3
PY = $(VENV)/bin/python
PYTEST_ARGS ?=
STAMP = $(VENV)/.installed

# DeepSpeed's shared-memory CPU op (deepspeed_shm_comm) is compiled into the venv at install, so
# no run ever JIT-compiles it. The JIT path (what a plain `pip install deepspeed` gives) builds it
# on the first deepspeed.comm start into ~/.cache/torch_extensions/py311_cu130/deepspeed_shm_comm:
# ONE folder for every venv on the machine, rebuilt (30 s idle, minutes under load) whenever
# ninja's recorded command hash changes: another venv's paths in build.ninja (other clones,
# worktrees, CI), or the other ninja on PATH (/usr/bin/ninja 1.11 and the venv's 1.13 hash the
# same command differently, so they rebuild after each other). Built ahead of time from
# DeepSpeed's sdist (DS_BUILD_SHM_COMM=1; no ninja, no -march=native in its flags), the op is
# imported from site-packages whatever the launcher, PATH or TORCH_EXTENSIONS_DIR.
DS_PIN = $(shell grep -E '^deepspeed==' requirements/lock.txt)
DS_OP_BUILD = DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PY) -m pip install \
	--no-deps --no-build-isolation --force-reinstall --no-binary deepspeed --no-cache-dir
# (--no-cache-dir: pip must neither reuse its cached pure-Python deepspeed wheel nor cache this
# torch-specific one for other venvs.)
DS_OP_CHECK = import deepspeed.git_version_info as v, deepspeed.ops.comm.deepspeed_shm_comm_op; \
	assert v.installed_ops["deepspeed_shm_comm"] and v.accelerator_name == "cpu", v.installed_ops

# Tests run offline, on CPU, one BLAS thread per process (many gloo processes share few cores).
# The venv's bin comes first on PATH, as after `source .venv/bin/activate`: scripts call
# accelerate / torchrun / deepspeed by name.
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
# reinstall. deepspeed is then reinstalled from source with its CPU shm op compiled in (see
# DS_OP_BUILD above; every time, so the op always matches the venv's torch), and checked.
$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements/lock.txt
	@echo "== compiling DeepSpeed's CPU shm op into the venv ($(DS_PIN), about 1 minute)"
	$(DS_OP_BUILD) "$(DS_PIN)"
	$(PY) -c '$(DS_OP_CHECK)'
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
