"""``python -m modeler`` serves (Kafka -> streaming ALS -> Redis) until SIGTERM/SIGINT;
``python -m modeler bootstrap --ratings FILE`` trains a batch model first (modeler.bootstrap)."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from common.logging import setup_logging


def serve() -> int:
    from pydantic import ValidationError

    from modeler.config import ModelerSettings
    from modeler.runtime import MissingDependency, check_java
    from modeler.service import ModelerService

    try:
        settings = ModelerSettings()
    except ValidationError as exc:
        # A bad setting (e.g. MODEL_CANDIDATES) is a start-up error naming the field, no traceback.
        for err in exc.errors():
            name = ".".join(str(x) for x in err.get("loc", ())) or "settings"
            print(f"modeler: invalid setting {name}: {err.get('msg')}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("modeler")
    try:
        check_java()
    except MissingDependency as exc:
        log.error("%s", exc)
        return 2
    service = ModelerService(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after the current batch", signum)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.metrics.serve(settings.metrics_port)
    log.info(
        "modeler: topic %s on %s -> Redis %s prefix %r, Spark %s, batches of <= %d records",
        settings.ratings_topic, settings.kafka_bootstrap_servers, _redact(settings.redis_url),
        settings.redis_prefix, settings.spark_master, settings.batch_max_records,
    )
    service.run()
    return 0


def _redact(url: str) -> str:
    # redis://user:password@host -> redis://***@host
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bootstrap":
        from modeler import bootstrap

        return int(bootstrap.main(argv[1:]) or 0)
    if argv and argv[0] not in ("serve",):
        sys.stderr.write("usage: python -m modeler [serve] | python -m modeler bootstrap --ratings FILE\n")
        return 2
    return serve()


if __name__ == "__main__":
    sys.exit(main())
