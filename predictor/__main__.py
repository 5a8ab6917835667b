"""``python -m predictor``: serve the API with uvicorn, configured from the environment."""

from __future__ import annotations

import os

# One BLAS thread per worker: requests are small matrix-vector products, and several worker
# processes already share the cores. Must be set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import logging  # noqa: E402

import uvicorn  # noqa: E402

from common.logging import setup_logging  # noqa: E402
from predictor.config import PredictorSettings  # noqa: E402


def main() -> None:
    settings = PredictorSettings()  # fields come from the env
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger(__name__).info(
        "predictor on %s:%d with %d worker(s)",
        settings.predictor_host, settings.predictor_port, settings.predictor_workers,
    )
    # A factory import string: every worker process builds its own app (and its own copy of
    # the model) from the same environment.
    uvicorn.run(
        "predictor.app:create_app",
        factory=True,
        host=settings.predictor_host,
        port=settings.predictor_port,
        workers=settings.predictor_workers,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


if __name__ == "__main__":
    main()
