"""Shared fixtures: real redis-server and Kafka-protocol broker on free ports, one
SparkSession for the whole run. Each test isolates itself by key prefix / topic / group."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.services import Process, create_topics, start_broker, start_redis

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
ML_SMALL = SHARED_DATA / "ml-latest-small"

_DIR_MARKERS = {"unit": "unit", "integration": "integration", "e2e": "e2e"}


# The files that take longest (seconds on the 2-core CI machine, both workers busy; from
# `pytest --junitxml`, 2026-12-04). `make test` runs the files on two workers, a file whole on
# one (`--dist loadfile`), handed out in collection order (`--no-loadscope-reorder`; xdist's
# own order is by number of tests, which put the one-test, three-minute files last and left
# one worker alone with them for minutes). Longest first is the classic greedy schedule: the
# run ends on short files. A stale figure costs some balance, never a result.
_FILE_SECONDS = {
    "tests/integration/test_batch_job.py": 255,
    "tests/integration/test_batch_cluster.py": 195,
    "tests/integration/test_deploy_image_runs.py": 160,
    "tests/integration/test_modeler_crash.py": 150,
    "tests/integration/test_resident_state.py": 110,
    "tests/integration/test_streaming_als.py": 105,
    "tests/integration/test_batch_publish.py": 100,
    "tests/integration/test_bootstrap_evaluate.py": 70,
    "tests/integration/test_cluster_mode.py": 65,
    "tests/integration/test_predictor_fuzz.py": 50,
    "tests/e2e/test_frontend_e2e.py": 50,
    "tests/integration/test_search_service.py": 40,
    "tests/integration/test_modeler_service.py": 40,
    "tests/integration/test_modeler_ranking.py": 25,
    "tests/integration/test_frontend_api.py": 25,
    "tests/integration/test_frontend_page.py": 18,
}


def _file_of(item: pytest.Item) -> str:
    return Path(str(item.fspath)).relative_to(ROOT).as_posix()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 1 and parts[1] in _DIR_MARKERS:
            item.add_marker(_DIR_MARKERS[parts[1]])
    # Stable: tests keep their order within a file, files without a figure keep theirs.
    items.sort(key=lambda item: -_FILE_SECONDS.get(_file_of(item), 0))


@pytest.fixture(scope="session")
def ml_small() -> Path:
    if not (ML_SMALL / "ratings.csv").exists():
        pytest.fail(f"MovieLens ml-latest-small not found at {ML_SMALL} (../shared/data)")
    return ML_SMALL


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_redis(workdir=tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: Process) -> str:
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def keys(redis_prefix: str):
    from common.keys import Keys

    return Keys(redis_prefix)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    proc = start_broker(workdir=tmp_path_factory.mktemp("broker"))
    yield proc
    # Clients a test left open would retry the stopped broker, logging, until the worker exits.
    from modeler.io.kafka_read import close_clients

    close_clients(proc.url)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    proc.stop()


@pytest.fixture(scope="session")
def bootstrap(broker: Process) -> str:
    return broker.url


@pytest.fixture
def topic(bootstrap: str) -> str:
    """A fresh 4-partition ratings topic (and its DLQ, ``<topic>.dlq``) for one test."""
    name = f"ratings-{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, {name: 4, f"{name}.dlq": 1})
    return name


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """One local SparkSession for the run (start-up takes ~25 s on 2 cores)."""
    from modeler.runtime import check_java
    from modeler.spark import get_spark

    check_java()
    session = get_spark(
        os.environ.get("TEST_SPARK_MASTER", "local[2]"),
        app_name="streamrec-tests",
        checkpoint_dir=str(tmp_path_factory.mktemp("checkpoints")),
    )
    yield session
    session.stop()
