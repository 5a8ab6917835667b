# Two commands: `make up` (the whole local stack) and `make test` (the whole suite).
# Both bootstrap what is missing: a virtualenv with every service's packages, and the
# few Debian packages the browser test needs when we are root.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help bootstrap up test test-fast lint bench bench-core bench-modeler bench-predictor bench-kafka bench-search eval clean

help:
	@echo "make up      start broker, Redis, modeler, predictor, frontend; stream MovieLens in"
	@echo "make test    the whole suite (unit, integration, spark, e2e)"
	@echo "make lint    ruff + mypy"
	@echo "make bench   benchmarks -> build/bench/*.json"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[modeler,predictor,frontend,local,dev]'
	@touch $(STAMP)

bootstrap: $(STAMP)
	@$(PY) -m devstack.bootstrap

up: bootstrap
	$(PY) -m devstack up $(if $(RATINGS_FILE),--ratings $(RATINGS_FILE),) $(if $(FRESH),--fresh,)

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: bootstrap
	$(PY) -m pytest -m "unit" $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check common modeler predictor frontend devstack tests
	$(VENV)/bin/mypy common predictor frontend

bench: bench-core bench-modeler bench-predictor bench-kafka bench-search

bench-core: bootstrap
	$(PY) -m tests.benchmarks.bench_core

bench-modeler: bootstrap
	$(PY) -m tests.benchmarks.bench_modeler

bench-predictor: bootstrap
	$(PY) -m tests.benchmarks.bench_predictor

bench-kafka: bootstrap
	$(PY) -m tests.benchmarks.bench_kafka_read

bench-search: bootstrap
	$(PY) -m tests.benchmarks.bench_search

eval: bootstrap
	$(PY) -m modeler.evaluate --ratings $(or $(RATINGS_FILE),../shared/data/ml-latest-small/ratings.csv) --out build/eval

clean:
	rm -rf build .pytest_cache
