# Two entry points that work on a fresh machine with only Python >= 3.11 and make:
#   make quickstart   set up a virtualenv, start the embedded two-region fleet, demo tenants
#   make test         set up a virtualenv, lint, type-check, check the import contracts and
#                     run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tenantctl quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy orchestrator cli tenant_schema backups bench
	$(BIN)/lint-imports --no-logo --no-cache  # the layer contracts: pyproject.toml [tool.importlinter]

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/provision.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/backup.py
	$(BIN)/python bench/retention.py
	$(BIN)/python bench/fleet.py

clean:
	-$(BIN)/tenantctl local down
	rm -rf $(VENV) .tenantctl tenantctl.toml
