# merit-jax developer entry points. Every target sets up what it needs:
# a virtual environment in .venv, the package installed in editable mode with
# its test extras (again only after pyproject.toml changes), and the offline
# default model and data in the cache (see `merit fetch --help`).

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.install-stamp
MERIT := $(VENV)/bin/merit
# Run directory of `make quickstart`; runs/ is git-ignored.
QUICKSTART_DIR ?= runs/quickstart
# Lint only the source folders that exist in this checkout.
LINT_PATHS := $(wildcard merit_jax tests benchmarks)

.PHONY: help quickstart test lint bench fetch install clean distclean

help:
	@echo "make quickstart  set up, fetch, then run MERIT end to end on configs/quickstart.yaml"
	@echo "make test        set up, fetch, then ruff, mypy and the full pytest suite (CPU)"
	@echo "make lint        ruff check, ruff format --check and mypy"
	@echo "make bench       run benchmarks/train_step.py"
	@echo "make fetch       download the offline default assets into the cache"
	@echo "make clean       remove tool caches and build outputs (keeps .venv and the cache)"
	@echo "make distclean   clean, and remove .venv"

$(VENV_PYTHON):
	@if ! command -v $(PYTHON) >/dev/null 2>&1; then \
	  echo "error: '$(PYTHON)' not found; merit-jax needs Python >= 3.11." >&2; \
	  echo "Run: make $(or $(MAKECMDGOALS),help) PYTHON=/path/to/python3.11" >&2; \
	  exit 1; \
	elif ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
	  echo "error: merit-jax needs Python >= 3.11, but $(PYTHON) is $$($(PYTHON) --version 2>&1)." >&2; \
	  echo "Run: make $(or $(MAKECMDGOALS),help) PYTHON=/path/to/python3.11" >&2; \
	  exit 1; \
	fi
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml is newer than the last successful install.
$(INSTALL_STAMP): pyproject.toml | $(VENV_PYTHON)
	@$(VENV_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: $(VENV) uses Python $$($(VENV_PYTHON) --version 2>&1); merit-jax needs >= 3.11." >&2; \
	  echo "Remove it with 'make distclean' and run make again." >&2; \
	  exit 1; }
	$(VENV_PYTHON) -m pip install -e '.[test]'
	touch $(INSTALL_STAMP)

install: $(INSTALL_STAMP)

fetch: install
	$(MERIT) fetch

# An interrupted quickstart resumes; a finished one (report.md exists) starts again.
quickstart: fetch
	$(MERIT) run configs/quickstart.yaml --out $(QUICKSTART_DIR) \
	  $(if $(wildcard $(QUICKSTART_DIR)/report.md),--overwrite)

# CI machines have no accelerator: tests and lints run on the CPU backend.
test lint: export JAX_PLATFORMS := cpu

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

test: fetch lint
	$(VENV)/bin/pytest -q

bench: install
	$(VENV_PYTHON) benchmarks/train_step.py

clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
