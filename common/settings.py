"""Settings read from the environment, and the naming rule every service's settings follow.

Build them in ``main()`` (or an app's lifespan) and pass them down; never at import time:
Spark executors re-import modules and may not have the driver's environment.
Each service subclasses :class:`CommonSettings` with its own fields.

Naming rule (README "Configuration"): shared infrastructure and the event contract keep
their conventional names (``KAFKA_*``, ``REDIS_*``, ``SPARK_*``, ``RATINGS_TOPIC``,
``DLQ_TOPIC``, ``RATING_MIN``/``RATING_MAX``, ``LOG_*``, the address ``PREDICTOR_URL``,
``EVENT_MAX_WEIGHT``); the modeler's hyper-parameters are ``MODEL_*`` (they map onto
``ALSParams``); every other setting is prefixed by the service that reads it (``MODELER_*``,
``PREDICTOR_*``, ``FRONTEND_*``). A renamed setting is declared
``validation_alias=renamed(NEW, was=OLD)``: the first name is the current one, the others
are still read for one release, with a logged warning naming the new one.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.schema import DEFAULT_RATING_MAX, DEFAULT_RATING_MIN, RatingScale

log = logging.getLogger(__name__)


class SettingName(NamedTuple):
    """The environment name a field is read from now, and the old names still accepted."""

    field: str
    name: str
    deprecated: tuple[str, ...] = ()


def setting_names(cls: type[BaseSettings]) -> list[SettingName]:
    """Every field of a Settings class with its current and deprecated environment names."""
    out = []
    for field_name, info in cls.model_fields.items():
        choices = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else []
        names = [c for c in choices if isinstance(c, str)]
        if names:
            out.append(SettingName(field_name, names[0], tuple(names[1:])))
        else:
            out.append(SettingName(field_name, info.alias or field_name.upper()))
    return out


def renamed(name: str, was: str) -> AliasChoices:
    """The ``validation_alias`` of a renamed setting: read from ``name``, or from ``was`` with a
    deprecation warning (for one release)."""
    return AliasChoices(name, was)


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

    @model_validator(mode="before")
    @classmethod
    def _warn_deprecated_names(cls, data: Any) -> Any:
        # pydantic-settings hands the environment over under the first (current) alias, so an
        # old name set in the environment is only visible in os.environ itself; names passed
        # as keyword arguments arrive as given.
        given = {str(k).upper() for k in data} if isinstance(data, dict) else set()
        environ = {k.upper() for k in os.environ}
        for s in setting_names(cls):
            for old in s.deprecated:
                if old not in given and old not in environ:
                    continue
                # An old name in the environment shows up in ``given`` under the new one, so
                # only the new name in os.environ, or both passed as arguments, override it.
                overridden = s.name in environ or (old in given and s.name in given and old not in environ)
                if overridden:
                    log.warning("setting %s is deprecated and ignored: %s is set", old, s.name)
                else:
                    log.warning("setting %s is deprecated (read for one more release): use %s",
                                old, s.name)
        return data

    @property
    def scale(self) -> RatingScale:
        return RatingScale(min=self.rating_min, max=self.rating_max)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap_servers.split(",") if s.strip()]
