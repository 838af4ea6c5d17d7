"""One settings model for every command, read from `SAGAFLOW_*` environment variables.

A wrong value fails at start-up with a message naming the variable, before
anything is started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    pass


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SAGAFLOW_", extra="ignore")

    # An external Postgres; when unset, local mode starts an embedded one in its state dir.
    database_url: str | None = None
    bus: Literal["postgres"] = "postgres"
    payloads: Literal["local"] = "local"
    payload_dir: Path | None = None
    # Orchestrator batch size: how many waiting events fold into one transaction.
    batch_size: int = Field(default=256, ge=1, le=10_000)
    # How long a receiver holds a message before it is redelivered.
    lock_duration_seconds: float = Field(default=30.0, gt=0, le=300)
    max_delivery_count: int = Field(default=10, ge=1, le=1000)
    runner_concurrency: int = Field(default=64, ge=1, le=10_000)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SAGAFLOW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise SettingsError(f"invalid configuration: {problems}") from exc
