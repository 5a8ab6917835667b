"""Fixtures of the integration tests beyond the shared ones (tests/conftest.py): the headless
Chromium ``page`` of the browser tests (a module defining its own ``page`` keeps it)."""

from tests.support.served import page  # noqa: F401
