"""Frontend settings: the common ones plus where to listen, the predictor and the write token."""

from __future__ import annotations

from pydantic import Field

from common.settings import CommonSettings, renamed


class FrontendSettings(CommonSettings):
    frontend_host: str = Field("0.0.0.0", alias="FRONTEND_HOST")
    frontend_port: int = Field(8080, alias="FRONTEND_PORT")
    predictor_url: str = Field("http://localhost:8000", alias="PREDICTOR_URL")
    # When set, POST /api/ratings needs `Authorization: Bearer <token>` (or X-Write-Token).
    write_token: str | None = Field(None, validation_alias=renamed("FRONTEND_WRITE_TOKEN", was="WRITE_TOKEN"))
    predictor_timeout_s: float = Field(
        3.0, validation_alias=renamed("FRONTEND_PREDICTOR_TIMEOUT_S", was="PREDICTOR_TIMEOUT_S"), gt=0)
    # Upper bound on how long a rating submission waits for the broker before answering 503.
    produce_timeout_s: float = Field(
        5.0, validation_alias=renamed("FRONTEND_PRODUCE_TIMEOUT_S", was="PRODUCE_TIMEOUT_S"), gt=0)
    # Most ratings one POST may carry (they are produced as one record batch, see kafka_writer).
    max_batch: int = Field(
        500, validation_alias=renamed("FRONTEND_MAX_RATINGS_PER_REQUEST", was="MAX_RATINGS_PER_REQUEST"), ge=1, le=5000)
