"""Settings of the Lyco API and workers: one pydantic-settings class read from the environment and ``.env``.

Every variable has the prefix ``LYCO_`` (``LYCO_DATABASE_URL``, ``LYCO_BROKER_URL``, ``LYCO_DATA_DIR`` …). The API
and the workers read the same class, through :func:`get_settings` (cached) in production code and ``Settings(...)``
in tests; nothing is read at import time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Values that mark a secret as "not configured yet"; refused outside development.
PLACEHOLDER_SECRETS = frozenset({"changethis", "change-me", "changeme"})


class Settings(BaseSettings):
    """Configuration of the API and the workers.

    Sizes are in MiB (``*_mb``), times in seconds (``*_s``). ``database_url`` defaults to a SQLite file in
    ``data_dir`` and ``models_dir`` to ``<data_dir>/models`` when they are not given.
    """

    model_config = SettingsConfigDict(env_prefix="LYCO_", env_file=".env", extra="ignore")

    environment: Literal["development", "production"] = Field(
        "development", description="'production' refuses placeholder secrets such as 'changethis'")
    data_dir: Path = Field(Path("./lyco-data"), description="root of the file store (uploads, outputs, job dirs)")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite:///<data_dir>/lyco.db")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker URL (Redis in a team setup)")
    broker_transport_options: dict[str, Any] = Field(
        default_factory=dict, description="extra Celery broker transport options (JSON), merged over the defaults")
    models_dir: Path = Field(Path("./lyco-data/models"),
                             description="folder of base models the API may register; default <data_dir>/models")
    max_upload_mb: int = Field(2048, gt=0, description="largest accepted upload (MiB)")
    max_zip_entries: int = Field(20_000, gt=0, description="most entries in an uploaded dataset zip")
    max_zip_total_mb: int = Field(8192, gt=0, description="largest uncompressed total of a dataset zip (MiB)")
    max_image_pixels: int = Field(64 * 1024 * 1024, gt=0, description="largest image (width x height) in a dataset")
    admin_key: str | None = Field(None, description="first admin API key, created at start-up if missing")
    visibility_timeout_s: int = Field(
        3 * 24 * 3600, gt=0, description="Redis visibility timeout; must exceed the hard time limit of any job")
    job_soft_time_limit_s: int = Field(24 * 3600, gt=0, description="soft time limit of a job (cancel and save)")
    job_hard_time_limit_s: int = Field(24 * 3600 + 600, gt=0, description="hard time limit of a job (kill)")
    max_attempts: int = Field(3, ge=1, description="deliveries of a job before it is marked failed")
    op_wait_s: float = Field(120.0, gt=0, description="how long an adapter-operation request waits for its CPU job")
    auth_cache_s: float = Field(
        2.0, ge=0, le=3600, description="how long an API process trusts a key it found valid before looking it up "
        "again (s); a key revoked through another process stops working within this time; 0: look up every request")
    api_threads: int = Field(
        20, ge=1, le=1000, description="threads of one API process for blocking work (database, files); each holds at "
        "most one database connection, so it is also the size of that process's PostgreSQL pool")

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'lyco.db'}"
        if "models_dir" not in self.model_fields_set:
            self.models_dir = self.data_dir / "models"
        self.models_dir = self.models_dir.expanduser().resolve()
        if not self.job_soft_time_limit_s < self.job_hard_time_limit_s < self.visibility_timeout_s:
            raise ValueError("need job_soft_time_limit_s < job_hard_time_limit_s < visibility_timeout_s "
                             "(else the broker redelivers a job that is still running)")
        if self.admin_key is not None:
            if self.admin_key.strip() != self.admin_key or len(self.admin_key) < 16:
                raise ValueError("admin_key must be at least 16 characters without surrounding spaces")
            if self.environment == "production" and self.admin_key in PLACEHOLDER_SECRETS:
                raise ValueError("admin_key still has a placeholder value; set LYCO_ADMIN_KEY")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment and ``.env``."""
    return Settings()
