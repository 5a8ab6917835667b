"""``python -m frontend``: serve the page and the API with uvicorn, configured from the env."""

from __future__ import annotations

import logging

import uvicorn

from frontend.app import create_app
from frontend.config import FrontendSettings


def main() -> None:
    settings = FrontendSettings()  # type: ignore[call-arg]  # fields come from the env
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python logs every refused reconnect at ERROR; while the broker is down that is a
    # line per backoff step. Our writer logs one line per failed request instead.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    uvicorn.run(
        create_app(settings), host=settings.frontend_host, port=settings.frontend_port,
        log_level=settings.log_level.lower(), proxy_headers=True,
        # The page polls every few seconds per visitor; an access line each time is noise.
        access_log=False,
    )


if __name__ == "__main__":
    main()
