# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	rm -rf demo
	$(BIN)/replicator demo --dir demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check replicator tests benchmarks
	$(BIN)/mypy

# Benchmarks against rsync (issue 4; see benchmarks/README.md). Needs rsync and openssh-server.
bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-quick: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run --quick $(BENCH_ARGS)
