"""Predictor settings, read from the environment (build them in main() or the lifespan)."""

from __future__ import annotations

from pydantic import Field

from common.settings import CommonSettings, renamed


class PredictorSettings(CommonSettings):
    predictor_host: str = Field("0.0.0.0", alias="PREDICTOR_HOST")
    predictor_port: int = Field(8000, alias="PREDICTOR_PORT")
    # Production runs several uvicorn worker processes, each holding its own model copy.
    predictor_workers: int = Field(1, ge=1, alias="PREDICTOR_WORKERS")
    # How long jiminy-style prediction results stay retrievable by id.
    prediction_ttl_s: int = Field(
        3600, ge=1, validation_alias=renamed("PREDICTOR_PREDICTION_TTL_S", was="PREDICTION_TTL_S"))
    # Pub/sub announces new versions; polling the pointer this often is the fallback.
    model_poll_interval_s: float = Field(
        2.0, gt=0, validation_alias=renamed("PREDICTOR_MODEL_POLL_INTERVAL_S", was="MODEL_POLL_INTERVAL_S"))
    # Redis socket timeouts: short, so an outage becomes a quick 503 rather than a hang.
    redis_timeout_s: float = Field(1.0, gt=0, alias="PREDICTOR_REDIS_TIMEOUT_S")
    # Users whose vector and rated set are cached per model version, per worker.
    user_cache_size: int = Field(100_000, ge=0, alias="PREDICTOR_USER_CACHE_SIZE")
    # Serve the ranking model with each user folded in from their whole history against the
    # version's item vectors (exact iALS user step), instead of the streamed user vector.
    refit_users: bool = Field(True, alias="PREDICTOR_REFIT_USERS")
    # Top-N batching under load (see predictor.batcher.TopNBatcher): a busy worker waits up to
    # this long for concurrent requests to share one pass over the item matrix ...
    batch_wait_ms: float = Field(2.0, ge=0, le=100, alias="PREDICTOR_BATCH_WAIT_MS")
    # ... or until this many are pending (bounds the time the event loop is blocked).
    max_batch: int = Field(32, ge=1, le=1024, alias="PREDICTOR_MAX_BATCH")
