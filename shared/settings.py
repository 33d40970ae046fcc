"""Settings every service reads at its process edge (pydantic-settings, ``KUNSERVE_*``).

Each service subclasses ``ServiceSettings`` with its own fields and hands its components plain
values or dataclasses; nothing below the edge reads the environment.
"""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KUNSERVE_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_endpoint: str | None = None  # OTLP/HTTP traces endpoint, e.g. http://host:4318/v1/traces
    log_level: str = "INFO"
