"""Settings read from the conventional environment variables.

Build them in ``main()`` (or an app's lifespan) and pass them down; never at import time:
Spark executors re-import modules and may not have the driver's environment.
Each service subclasses :class:`CommonSettings` with its own fields.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.schema import DEFAULT_RATING_MAX, DEFAULT_RATING_MIN, RatingScale


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: str = Field("localhost:9092", alias="KAFKA_BOOTSTRAP_SERVERS")
    ratings_topic: str = Field("ratings", alias="RATINGS_TOPIC")
    dlq_topic: str = Field("ratings.dlq", alias="DLQ_TOPIC")
    redis_url: str = Field("redis://localhost:6379/0", alias="REDIS_URL")
    # Every key this project writes starts with this prefix (tests isolate by prefix).
    redis_prefix: str = Field("rec", alias="REDIS_PREFIX")
    spark_master: str = Field("local[*]", alias="SPARK_MASTER")
    rating_min: float = Field(DEFAULT_RATING_MIN, alias="RATING_MIN")
    rating_max: float = Field(DEFAULT_RATING_MAX, alias="RATING_MAX")
    log_level: str = Field("INFO", alias="LOG_LEVEL")
    # "text" or "json" (one object per line, for log collectors): common.logging.
    log_format: str = Field("text", alias="LOG_FORMAT")

    @property
    def scale(self) -> RatingScale:
        return RatingScale(min=self.rating_min, max=self.rating_max)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]
