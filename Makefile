# The two commands a newcomer needs: `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing else by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint chaos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kodmobi demo

test: install
	$(BIN)/ruff check worker tests scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check worker tests scripts
	$(BIN)/mypy

chaos: install
	$(BIN)/python scripts/chaos.py

bench: install
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) .kodmobi .pytest_cache .mypy_cache .ruff_cache
