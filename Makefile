# dvp: run it with `make demo`, test it with `make test`. Both set everything up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=

# node_modules is built only once a package.json exists (the Solidity compiler and
# the local EVM node come from npm); until then setup is the Python venv alone.
NODE_MODULES := $(if $(wildcard package.json),node_modules)

.PHONY: help setup browser demo test lint clean distclean bench

help: ## Show this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_.-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV) $(NODE_MODULES) ## Install the Python venv and, if package.json exists, node_modules

# A directory target: its mtime is set on success and reset on failure, so a broken
# install is retried and a good one reruns only when pyproject.toml changes.
$(VENV): pyproject.toml
	@echo "==> $(VENV): $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -e '.[test,dev]'"
	@if $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -e '.[test,dev]'; \
	then touch $(VENV); else touch -c -d @0 $(VENV) 2>/dev/null; exit 1; fi

# `npm ci` refuses a lock file that lacks optional packages for other platforms (the
# registry reachable here does not serve all of anvil's); `npm install` still honours
# the versions the lock pins, so it is the fallback.
node_modules: package.json $(wildcard package-lock.json)
	@echo "==> node_modules: npm $(if $(wildcard package-lock.json),ci,install)"
	@if { if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error \
	        || { echo "==> npm ci failed; trying npm install"; npm install --no-audit --no-fund; }; \
	      else npm install --no-audit --no-fund; fi; }; \
	then touch node_modules; else touch -c -d @0 node_modules 2>/dev/null; exit 1; fi

# The Web UI test (tests/test_encryption.py) opens the dev server's UI in headless
# Chromium: Debian's chromium package, installed once if it is missing.
browser: ## Install Debian's chromium (the Web UI test renders the UI headless) if missing
	@command -v chromium >/dev/null || { \
	  echo "==> apt-get install -y chromium"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

demo: setup ## Run the end-to-end settlement demo
	$(VENV)/bin/dvp demo

# pytest exits 5 when it collected nothing; say so, since make reports every failure as 2.
test: setup browser ## Run the test suite (pass options with PYTEST_ARGS="-k name -x")
	@echo "$(VENV)/bin/pytest -q $(PYTEST_ARGS)"
	@$(VENV)/bin/pytest -q $(PYTEST_ARGS) || { status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; \
	  exit $$status; }

bench: setup ## Run the settlement benchmark
	$(VENV)/bin/dvp bench

# The tools are the dev extra's, pinned in pyproject.toml; .pre-commit-config.yaml runs the same.
lint: $(VENV) ## Check the code: ruff, mypy, the import contracts (lint-imports) and the dependencies (deptry)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/deptry .

clean: ## Remove caches, build leftovers and the demo's state (.dvp/)
	rm -rf .pytest_cache .ruff_cache .mypy_cache .import_linter_cache build dist *.egg-info .dvp bench-results
	find . -path ./$(VENV) -prune -o -path ./node_modules -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean ## Also remove the venv and node_modules
	rm -rf $(VENV) node_modules
