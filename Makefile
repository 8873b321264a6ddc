# The two commands for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-quick format clean redis-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,lint,bench]'
	touch $@

## The main job: simulate an observation on the embedded LMDB store (no server needed).
run: $(STAMP)
	$(BIN)/python -m telstate.demo demo-store --overwrite

## Install everything (redis-server included) and run the test suite.
test: $(STAMP) redis-server
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check telstate replicator tests benchmarks
	$(BIN)/ruff format --check telstate replicator tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix telstate replicator tests benchmarks
	$(BIN)/ruff format telstate replicator tests benchmarks

bench: $(STAMP) redis-server
	$(BIN)/python -m benchmarks

bench-quick: $(STAMP) redis-server
	$(BIN)/python -m benchmarks --quick

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server (apt-get)"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server is missing: install it (Debian: sudo apt-get install redis-server) and re-run"; exit 1; \
	  fi; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
