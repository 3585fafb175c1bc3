"""Shared fixtures of the service tests (real PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379).

- ``pg_url`` (module): a fresh PostgreSQL database ``lyco_test_<module>_<random>``, dropped after the module.
- ``redis_url`` (module): a Redis DB number of this module's own (see ``REDIS_DB``), flushed before and after.
- ``sqlite_url``: a SQLite file in the test's tmp dir.
- ``make_settings(**overrides)``: ``Settings`` with a tmp ``data_dir``, ``pg_url`` and ``redis_url`` (no ``.env``).
- ``service`` (module): app + ``TestClient`` on PostgreSQL with keys ``admin_key``, ``user_key`` (alice:
  read, submit) and ``other_key`` (bob: read, submit); ``client``, ``headers(key)``.
"""

from __future__ import annotations

import re
import secrets
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg import sql

from lyco_api.settings import Settings

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URL_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432/"
REDIS_BASE = "redis://127.0.0.1:6379/"

#: Redis DB number per test module, so modules running in parallel (other helpers) never share a DB.
REDIS_DB = {
    "test_sv_foundation": 1,
    "test_sv_auth": 2,
    "test_sv_files": 3,
    "test_sv_ops": 4,
    "test_sv_jobs": 5,
    "test_sv_worker_e2e": 6,
    "test_sv_serve": 7,
    "test_sv_compose": 8,
    "test_sv_schema": 9,
}

ADMIN_KEY = "lyco_0a0a0a0a_" + "A" * 40


def _module_name(request: pytest.FixtureRequest) -> str:
    return str(request.module.__name__).rsplit(".", 1)[-1]


def redis_db_for(module: str) -> int:
    """The Redis DB number of a test module (unlisted modules hash into 10..15)."""
    return REDIS_DB.get(module, 10 + zlib.crc32(module.encode()) % 6)


def create_pg_database(tag: str) -> str:
    """Create an empty PostgreSQL database named ``lyco_test_<tag>_<random>``; returns its name."""
    name = f"lyco_test_{re.sub(r'[^a-z0-9]', '_', tag.lower())[:30]}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def drop_pg_database(name: str) -> None:
    """Drop a test database, disconnecting whoever still uses it."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test module (dropped afterwards)."""
    name = create_pg_database(_module_name(request).removeprefix("test_"))
    try:
        yield PG_URL_BASE + name
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="module")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """``redis://127.0.0.1:6379/<n>`` with this module's own DB number, flushed before and after."""
    url = REDIS_BASE + str(redis_db_for(_module_name(request)))
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file in the test's tmp dir."""
    return f"sqlite:///{tmp_path / 'lyco.db'}"


def build_settings(data_dir: Path, **overrides: Any) -> Settings:
    """``Settings`` that ignore ``.env`` and take ``overrides`` over test defaults."""
    values: dict[str, Any] = {"data_dir": data_dir, "environment": "development"}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def make_settings(tmp_path: Path, pg_url: str, redis_url: str) -> Callable[..., Settings]:
    """Factory: ``make_settings(**overrides)`` → Settings on this module's PostgreSQL DB and Redis DB."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("database_url", pg_url)
        overrides.setdefault("broker_url", redis_url)
        data_dir = overrides.pop("data_dir", tmp_path / "data")
        return build_settings(Path(data_dir), **overrides)

    return factory


@dataclass
class Service:
    """A running app (in-process) with its client and three keys."""

    app: FastAPI
    client: TestClient
    settings: Settings
    admin_key: str
    user_key: str
    other_key: str

    @staticmethod
    def headers(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.headers(self.admin_key)

    @property
    def user(self) -> dict[str, str]:
        return self.headers(self.user_key)

    @property
    def other(self) -> dict[str, str]:
        return self.headers(self.other_key)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str) -> Iterator[Service]:
    """The API on this module's PostgreSQL DB: admin key from ``admin_key`` settings, alice's and bob's keys."""
    from lyco_api.app import create_app
    from lyco_api.auth import create_key
    from lyco_api.db import session_scope

    data_dir = tmp_path_factory.mktemp("service-data")
    settings = build_settings(data_dir, database_url=pg_url, broker_url=redis_url, admin_key=ADMIN_KEY)
    app = create_app(settings)
    with session_scope(app.state.engine) as s:
        _, user_key = create_key(s, "alice", ["read", "submit"])
        _, other_key = create_key(s, "bob", ["read", "submit"])
    with TestClient(app) as client:
        yield Service(app, client, settings, ADMIN_KEY, user_key, other_key)


@pytest.fixture
def client(service: Service) -> TestClient:
    return service.client


@pytest.fixture(autouse=True)
def _no_lyco_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build settings explicitly; stray LYCO_<setting> variables of the shell must not leak in."""
    for field in Settings.model_fields:
        monkeypatch.delenv(f"LYCO_{field.upper()}", raising=False)
