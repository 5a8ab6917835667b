"""Predictor: serves predicted ratings and top-N from the factor snapshots in Redis.

Never imports pyspark. The maths lives in :mod:`predictor.model` (numpy only: the explicit
rating model and the ranking model), Redis I/O in :mod:`predictor.store`, HTTP laid out like
the FastAPI full-stack template: :mod:`predictor.schemas`, :mod:`predictor.errors`,
:mod:`predictor.deps`, :mod:`predictor.serving` (what the routes compute), one router per area
in :mod:`predictor.routes` (recommend, predict, items, ops, jiminy), :mod:`predictor.batcher`,
:mod:`predictor.metrics`, :mod:`predictor.hotpath`, assembled by :func:`predictor.app.create_app`
(OpenAPI at ``/docs``).

Run: ``python -m predictor``. Environment (see :mod:`predictor.config`): ``REDIS_URL``,
``REDIS_PREFIX``, ``RATING_MIN``/``RATING_MAX``, ``LOG_LEVEL`` (common), and
``PREDICTOR_HOST`` (0.0.0.0), ``PREDICTOR_PORT`` (8000), ``PREDICTOR_WORKERS`` (1; each
worker process holds its own copy of the model), ``PREDICTOR_PREDICTION_TTL_S`` (3600, jiminy results),
``PREDICTOR_MODEL_POLL_INTERVAL_S`` (2.0, fallback to pub/sub), ``PREDICTOR_REDIS_TIMEOUT_S`` (1.0),
``PREDICTOR_USER_CACHE_SIZE`` (100000 users per worker and version). With several workers,
set ``PROMETHEUS_MULTIPROC_DIR`` to an empty writable directory so ``/metrics`` aggregates
all of them (otherwise each scrape sees the worker that answered).

Catalogue and popular fallback: ``python -m predictor.load_catalog --movies movies.csv
--ratings ratings.csv``.
"""
