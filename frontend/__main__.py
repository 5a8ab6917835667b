"""``python -m frontend``: serve the page and the API with uvicorn, configured from the env."""

from __future__ import annotations

import logging

import uvicorn

from common.logging import setup_logging
from frontend.app import create_app
from frontend.config import FrontendSettings


def main() -> None:
    settings = FrontendSettings()  # fields come from the env
    # kafka-python logs every refused reconnect at ERROR; while the broker is down that is a
    # line per backoff step. Our writer logs one line per failed request instead.
    setup_logging(settings.log_level, settings.log_format, quiet={"kafka": logging.CRITICAL})
    uvicorn.run(
        create_app(settings), host=settings.frontend_host, port=settings.frontend_port,
        log_level=settings.log_level.lower(), proxy_headers=True,
        # The page polls every few seconds per visitor; an access line each time is noise.
        access_log=False,
    )


if __name__ == "__main__":
    main()
