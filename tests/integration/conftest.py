"""Fixtures of the integration tests beyond the shared ones (tests/conftest.py): the headless
Chromium ``page`` of the browser tests (a module defining its own ``page`` keeps it) and the
Spark ``standalone`` cluster (one per test module that asks for it), and the batch job's
planted ``events`` and their file ``events_file`` (one per module)."""

from tests.support.batch_job import events, events_file  # noqa: F401
from tests.support.served import page  # noqa: F401
from tests.support.standalone import standalone  # noqa: F401
