"""One root exception for the project; third-party errors are re-raised ``from exc``.

Every exception this project defines derives from :class:`StreamrecError`, or from
:class:`InfraUnavailable` (under it) when the fault is an outage that a retry with backoff
may cure (services answer those with 503). A class that callers used to catch as a builtin
keeps that builtin as a second base (``class InvalidRating(StreamrecError, ValueError)``),
so ``except ValueError`` written against it still works.
"""


class StreamrecError(Exception):
    """Root of every error this project raises on purpose."""


class DatasetError(StreamrecError):
    """A ratings or catalogue file cannot be read (format unknown, bad row in strict mode)."""


class InfraUnavailable(StreamrecError):
    """Redis, the broker or Spark is not reachable right now; callers retry or answer 503."""
