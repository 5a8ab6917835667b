"""Logging set-up shared by every entry point: one format, plain text or JSON lines.

Call :func:`setup_logging` once in ``main()``; modules log through
``logging.getLogger(__name__)`` with %-style arguments. ``LOG_FORMAT=json`` gives one JSON
object per line (time, level, logger, process, message, exception) for log collectors.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"

# Third-party loggers that are noisy at INFO: kafka-python logs every refused reconnect,
# py4j every gateway call. Services may pass their own levels.
QUIET = {"kafka": logging.WARNING, "py4j": logging.WARNING}


_OURS = "_streamrec_handler"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, process, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when a record is emitted, not
    as it was when the handler was made: a stream swapped out since (a test's capture that
    ended, a redirect) is never written to after it was closed, e.g. by a Kafka client's
    background thread logging a lost broker."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass  # always the current sys.stderr


def setup_logging(level: str = "INFO", fmt: str = "text", quiet: Mapping[str, int] | None = None) -> None:
    """Route the root logger to stderr in ``fmt`` ("text" or "json") at ``level``."""
    if fmt not in ("text", "json"):
        raise ValueError(f"LOG_FORMAT must be 'text' or 'json', not {fmt!r}")
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    # Replace a handler of an earlier call, and only that: handlers someone else attached
    # (a test's log capture, an embedding application's) stay.
    root.handlers[:] = [h for h in root.handlers if not getattr(h, _OURS, False)] + [handler]
    root.setLevel(level.upper())
    for name, lvl in (QUIET if quiet is None else quiet).items():
        logging.getLogger(name).setLevel(lvl)
