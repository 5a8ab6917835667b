"""common.logging: one set-up for every entry point, repeatable, polite to other handlers."""

from __future__ import annotations

import json
import logging

import pytest

from common.logging import JsonFormatter, setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = saved
    root.setLevel(level)


def test_setup_twice_keeps_one_handler_of_ours_and_others_handlers(restore_root) -> None:
    other = logging.NullHandler()
    restore_root.addHandler(other)
    setup_logging("INFO")
    setup_logging("DEBUG", "json")
    ours = [h for h in restore_root.handlers if getattr(h, "_streamrec_handler", False)]
    assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    assert other in restore_root.handlers and restore_root.level == logging.DEBUG


def test_json_lines_carry_level_logger_and_message() -> None:
    record = logging.LogRecord("modeler.x", logging.WARNING, __file__, 1, "lag %d", (7,), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "modeler.x", "lag 7")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        setup_logging("INFO", "xml")


def test_records_go_to_stderr_as_it_is_now_never_to_a_closed_stream(restore_root, monkeypatch) -> None:
    """A Kafka client's thread that logs after the stream it started with was closed (a
    test's capture that ended) writes to the current stderr instead of failing."""
    import io
    import sys

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging("INFO")
    logging.getLogger("t").warning("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("t").warning("two")  # the old stream is closed: must not raise or print a traceback
    assert "two" in second.getvalue() and "one" not in second.getvalue()
