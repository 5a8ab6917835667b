"""One root exception for the project; third-party errors are re-raised ``from exc``."""


class StreamrecError(Exception):
    """Root of every error this project raises on purpose."""


class DatasetError(StreamrecError):
    """A ratings or catalogue file cannot be read (format unknown, bad row in strict mode)."""


class InfraUnavailable(StreamrecError):
    """Redis, the broker or Spark is not reachable right now; callers retry or answer 503."""
