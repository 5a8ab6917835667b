# Two commands: `make up` (the whole local stack) and `make test` (the whole suite).
# Both bootstrap what is missing: a virtualenv with every service's packages, and the
# few Debian packages the browser test needs when we are root.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: a test file runs whole on one worker (its module
# fixtures, e.g. a Spark job's data, are built once), each worker has its own SparkSession,
# broker and Redis on free ports. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: help bootstrap up test test-fast lint bench bench-core bench-modeler bench-predictor bench-kafka bench-batch bench-search bench-scale bench-task eval batch-demo clean

help:
	@echo "make up      start broker, Redis, modeler, predictor, frontend; stream MovieLens in"
	@echo "make test    the whole suite (unit, integration, spark, e2e)"
	@echo "make lint    ruff + mypy"
	@echo "make bench   benchmarks -> build/bench/*.json"
	@echo "make batch-demo  the batch job on ml-latest-small (implicit) -> build/batch/"

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
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

test-fast: bootstrap
	$(PY) -m pytest -m "unit" $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check common modeler predictor frontend devstack tests
	$(VENV)/bin/mypy common modeler predictor frontend devstack

bench: bench-core bench-modeler bench-predictor bench-kafka bench-batch bench-search

bench-core: bootstrap
	$(PY) -m tests.benchmarks.bench_core

bench-modeler: bootstrap
	$(PY) -m tests.benchmarks.bench_modeler

# CPU per 10k ratings of the modeler's one-partition training task, in-process (no Spark);
# repeatable under load. Not part of `make bench`.
bench-task: bootstrap
	$(PY) -m tests.benchmarks.bench_task_cpu

bench-predictor: bootstrap
	$(PY) -m tests.benchmarks.bench_predictor

bench-kafka: bootstrap
	$(PY) -m tests.benchmarks.bench_kafka_read

# BENCH_BATCH_ARGS=--skip-full skips the full ML-25M-sized recommend-for-all (CPU heavy).
bench-batch: bootstrap
	$(PY) -m tests.benchmarks.bench_batch $(BENCH_BATCH_ARGS)

bench-search: bootstrap
	$(PY) -m tests.benchmarks.bench_search

# An ML-25M-shaped backlog through the broker into the modeler at ranks 10 and 50 (long:
# not part of `make bench`). BENCH_SCALE_ARGS="--ratings 1000000 --ranks 10" for a shorter run;
# "--kill-at 0.6" adds a kill -9 and restart mid-stream (exactly once, restart time),
# "--fresh-seconds 60" a freshness phase at 70% of the measured throughput once drained.
bench-scale: bootstrap
	nice -n 10 $(PY) -m tests.benchmarks.bench_scale $(BENCH_SCALE_ARGS)

eval: bootstrap
	$(PY) -m modeler.evaluate --ratings $(or $(RATINGS_FILE),../shared/data/ml-latest-small/ratings.csv) --out build/eval

# The seeds' batch job on ml-latest-small as implicit data ("rated" = played): grid search,
# top 10 for every user and 10 similar items for every item, Parquet with the original ids.
batch-demo: bootstrap
	$(PY) -m modeler.batch --input $(or $(RATINGS_FILE),../shared/data/ml-latest-small/ratings.csv) \
		--implicit --ranks 10,50 --regs 0.01,0.1 --alphas 1,10 --top 10 --similar 10 --format parquet \
		--out build/batch $(BATCH_ARGS)

clean:
	rm -rf build .pytest_cache
