"""Database models and engine helpers (SQLAlchemy 2), for PostgreSQL (team server) and SQLite (``lyco serve``).

Tables: ``users``, ``api_keys``, ``files``, ``jobs``, ``job_events``, ``op_results``. JSON columns use the portable
:class:`sqlalchemy.JSON` type (``json`` on PostgreSQL, text on SQLite); top-level changes of a dict or list column
(``job.progress["step"] = 3``) are tracked. Timestamps are timezone-aware UTC on both back ends.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.types import TypeDecorator

FILE_KINDS = ("adapter", "dataset", "image", "report", "model", "other")
JOB_KINDS = ("train", "generate", "evaluate", "op")
QUEUES = ("gpu", "cpu")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A new random id (uuid4, 36 characters)."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


_JSONDict = MutableDict.as_mutable(JSON)
_JSONList = MutableList.as_mutable(JSON)


class Base(DeclarativeBase):
    """Declarative base of every Lyco table."""


class User(Base):
    """A person or service account. Every job and file belongs to one user."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="user", cascade="all, delete-orphan")


class ApiKey(Base):
    """An API key: only its sha256 is stored; ``prefix`` identifies it in lists and logs (not secret)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(_JSONList, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, default=None)

    user: Mapped[User] = relationship(back_populates="keys")


class StoredFile(Base):
    """A file in the store: ``path`` is relative to ``data_dir``; the row exists only once the file is complete."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    meta: Mapped[dict[str, Any]] = mapped_column(_JSONDict, default=dict)


class Job(Base):
    """A training, generation, evaluation or adapter-operation job; the broker carries only its id.

    ``duration_s`` (seconds of the last attempt, set when the job ends) feeds the duration histogram.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_queue", "state", "queue"),
        Index("ix_jobs_user_created", "user_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    queue: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    params: Mapped[dict[str, Any]] = mapped_column(_JSONDict, default=dict)
    progress: Mapped[dict[str, Any] | None] = mapped_column(_JSONDict, nullable=True, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(_JSONDict, nullable=True, default=None)
    error: Mapped[str | None] = mapped_column(Text, nullable=True, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, default=None)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True, default=None)


class JobEvent(Base):
    """One event of a job (state change, progress, log line …); ``id`` orders events and is the SSE event id."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(_JSONDict, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class OpResult(Base):
    """The report of a pure adapter operation, keyed by a digest of the operation, its options and the sha256 of its
    input files (see :mod:`lyco_api.opcache`): stored files never change, so the same inputs give the same report."""

    __tablename__ = "op_results"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    op: Mapped[str] = mapped_column(String(16))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


#: Session factory; bind it per use: ``Session(bind=engine)``. Objects stay readable after commit.
Session = sessionmaker(expire_on_commit=False)


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for PostgreSQL URLs given as ``postgres://`` or ``postgresql://``."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 30) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout (API and worker share the file).

    JSON columns are parsed with orjson (several times faster than :mod:`json` on the ~100 KB inspect summaries
    and reports rows hold). PostgreSQL: a pool of ``pool_size`` connections kept open plus ``max_overflow`` opened
    under peaks (closed again when returned); connections idle for more than :data:`PING_IDLE_S` are checked before
    use.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               json_deserializer=orjson.loads)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=30,
                           connect_args={"connect_timeout": 5}, json_deserializer=orjson.loads)
    _ping_when_idle(engine, PING_IDLE_S)
    return engine


#: A pooled connection unused for longer than this is checked with a round trip before it is handed out (s).
PING_IDLE_S = 10.0


def _ping_when_idle(engine: Engine, idle_s: float) -> None:
    """Check a pooled connection before use only when it sat idle for more than ``idle_s`` seconds.

    SQLAlchemy's ``pool_pre_ping`` costs a round trip on every checkout (a request checks out one or two); a
    connection in steady use does not need it, and one that dropped while busy fails its query and is discarded by
    SQLAlchemy's disconnect handling anyway. After a database restart the idle connections are found dead here,
    and the pool replaces them without the request noticing.
    """

    @event.listens_for(engine, "checkin")
    def _stamp(_dbapi_conn: Any, record: Any) -> None:
        record.info["lyco_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("lyco_idle_since")
        if since is None or time.monotonic() - since <= idle_s:
            return
        try:
            with dbapi_conn.cursor() as cur:
                cur.execute("SELECT 1")
            dbapi_conn.rollback()
        except Exception as e:
            raise DisconnectionError(f"stale pooled connection: {type(e).__name__}") from e


def init_db(engine: Engine) -> None:
    """Create missing tables (idempotent). On PostgreSQL an advisory lock serialises processes that start together;
    on SQLite a lost race (``table … already exists``, ``database is locked``) is retried."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(7428061)"))
            Base.metadata.create_all(conn)
        return
    for attempt in range(10):  # SQLite: processes starting together may race on CREATE TABLE
        try:
            Base.metadata.create_all(engine)
            return
        except OperationalError as e:
            if attempt == 9 or ("already exists" not in str(e) and "locked" not in str(e)):
                raise
            time.sleep(0.05 * (attempt + 1))


@contextmanager
def session_scope(engine: Engine) -> Iterator[OrmSession]:
    """A session that commits when the block ends normally and rolls back on an exception."""
    with Session(bind=engine) as s:
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
