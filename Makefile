# `make demo` and `make test` set everything up themselves on a fresh machine (Python 3.11+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test check lint typecheck pytest system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

## Run the main job (`opticam run`) on the bundled demo: CPU, no server, no network.
demo: $(STAMP)
	$(BIN)/opticam run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/sizes.py

typecheck: $(STAMP)
	$(BIN)/mypy

## System packages the tests need: Debian's Chromium for the report's browser test.
system-deps:
	.ci/install-chromium

pytest: $(STAMP) system-deps
	$(BIN)/pytest -q

## Install what the tests need (venv, packages, Chromium), lint, type-check, run the tests,
## build the manual.
test: lint typecheck pytest docs

## Build the manual into site/; --strict fails on a dead link, anchor or reference.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

## The quick loop after an edit: lint, type-check and every test not marked e2e (no
## server, browser or subprocess; see pyproject.toml). `make test` runs them all.
check: lint typecheck
	$(BIN)/pytest -q -m "not e2e"

clean:
	rm -rf $(VENV) opticam-runs site .pytest_cache .mypy_cache .ruff_cache
