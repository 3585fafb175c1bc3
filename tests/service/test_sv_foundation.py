"""Foundation of the service: settings, models on PostgreSQL and SQLite, the job state machine, the file store,
enqueueing through real Redis, health/readiness/metrics and the error handlers."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import logging
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from conftest import PG_ADMIN_DSN, Service, build_settings
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from lyco_api import app as app_module
from lyco_api.app import create_app
from lyco_api.db import ApiKey, Job, JobEvent, Session, StoredFile, User, init_db, make_engine, session_scope
from lyco_api.jobs import (
    TERMINAL,
    IllegalTransitionError,
    add_event,
    create_job,
    events_after,
    request_cancel,
    retry_job,
    transition,
    update_progress,
)
from lyco_api.queue import BrokerUnavailableError, enqueue, ping_broker
from lyco_api.settings import Settings
from lyco_api.store import FileStore, TooLargeError, safe_name
from lyco_core.errors import CorruptFileError, FileExistsLycoError, InvalidConfigError, NotFoundError

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
# The lifecycle of issue 6, written out independently of lyco_api.jobs.TRANSITIONS.
EXPECTED_LEGAL = {
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"), ("running", "queued"),
    ("failed", "queued"), ("cancelled", "queued"),
}
DEAD_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else f"sqlite:///{tmp_path / 'x.db'}"
    eng = make_engine(url)
    init_db(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    eng = make_engine(pg_url)
    init_db(eng)
    yield eng
    eng.dispose()


def _user(engine: Engine, name: str | None = None) -> int:
    with session_scope(engine) as s:
        u = User(name=name or f"u{time.perf_counter_ns()}", is_admin=False)
        s.add(u)
        s.flush()
        return u.id


def _job_in(engine: Engine, user_id: int, state: str) -> str:
    """A job brought to ``state`` through legal transitions."""
    path = {"queued": [], "running": ["running"], "succeeded": ["running", "succeeded"],
            "failed": ["running", "failed"], "cancelled": ["cancelled"]}[state]
    with session_scope(engine) as s:
        job = create_job(s, user_id, "train", {"steps": 2})
        for st in path:
            transition(s, job, st)
        return job.id


# ---- settings -------------------------------------------------------------------------------------------------


def test_settings_defaults_derive_from_data_dir(tmp_path: Path) -> None:
    s = build_settings(tmp_path / "d")
    assert s.data_dir == (tmp_path / "d").resolve()
    assert s.database_url == f"sqlite:///{(tmp_path / 'd').resolve() / 'lyco.db'}"
    assert s.models_dir == (tmp_path / "d").resolve() / "models"
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.job_soft_time_limit_s < s.job_hard_time_limit_s < s.visibility_timeout_s


def test_settings_from_env_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("LYCO_MAX_UPLOAD_MB=7\nLYCO_BROKER_URL=redis://elsewhere:6379/3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LYCO_DATA_DIR", str(tmp_path / "env-data"))
    monkeypatch.setenv("LYCO_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("LYCO_BROKER_TRANSPORT_OPTIONS", '{"max_connections": 20}')
    s = Settings()
    assert s.max_upload_mb == 7
    assert s.broker_url == "redis://elsewhere:6379/3"
    assert s.max_attempts == 5
    assert s.broker_transport_options == {"max_connections": 20}
    assert s.database_url.endswith(str((tmp_path / "env-data").resolve() / "lyco.db"))
    monkeypatch.setenv("LYCO_BROKER_URL", "redis://fromenv:6379/1")
    assert Settings().broker_url == "redis://fromenv:6379/1"  # the environment wins over .env


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"visibility_timeout_s": 60, "job_hard_time_limit_s": 120, "job_soft_time_limit_s": 100}, "visibility"),
    ({"job_soft_time_limit_s": 500, "job_hard_time_limit_s": 400}, "soft"),
    ({"admin_key": "short"}, "admin_key"),
    ({"max_upload_mb": 0}, "max_upload_mb"),
])
def test_settings_reject_bad_values(tmp_path: Path, overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        build_settings(tmp_path, **overrides)


# ---- models ---------------------------------------------------------------------------------------------------


def test_models_round_trip(engine: Engine) -> None:
    uid = _user(engine, "model-user")
    big = 5 * 1024**3  # over 2**31: the size column must be 64-bit
    with session_scope(engine) as s:
        s.add(ApiKey(user_id=uid, prefix="abcd1234", key_hash="0" * 64, scopes=["read", "submit"]))
        s.add(StoredFile(id="f" * 36, user_id=uid, kind="adapter", name="a.safetensors", path="files/x",
                         size=big, sha256="1" * 64, meta={"algos": {"lora": 3}, "tags": ["x", "y"]}))
        job = create_job(s, uid, "generate", {"prompts": ["a cat"], "seeds": [1, 2], "nested": {"k": [1.5]}})
        jid = job.id
    with Session(bind=engine) as s:
        key = s.scalar(select(ApiKey).where(ApiKey.prefix == "abcd1234"))
        f = s.get(StoredFile, "f" * 36)
        job2 = s.get(Job, jid)
        assert key is not None
        assert f is not None
        assert job2 is not None
        assert key.scopes == ["read", "submit"]
        assert key.revoked_at is None
        assert f.size == big
        assert f.meta == {"algos": {"lora": 3}, "tags": ["x", "y"]}
        assert job2.params == {"prompts": ["a cat"], "seeds": [1, 2], "nested": {"k": [1.5]}}
        assert (job2.kind, job2.queue, job2.state, job2.attempts, job2.max_attempts) == ("generate", "gpu",
                                                                                        "queued", 0, 3)
        assert job2.cancel_requested is False
        assert job2.progress is None
        assert job2.result is None
        assert job2.created_at.tzinfo is not None
        assert abs(job2.created_at - datetime.now(UTC)) < timedelta(minutes=1)
        # top-level mutation of a JSON column is tracked and persisted
        job2.params["steps"] = 7
        f.meta["checked"] = True
        s.commit()
    with Session(bind=engine) as s:
        assert s.get(Job, jid).params["steps"] == 7  # type: ignore[union-attr]
        assert s.get(StoredFile, "f" * 36).meta["checked"] is True  # type: ignore[union-attr]


def test_init_db_from_processes_starting_together(tmp_path: Path) -> None:
    """API and workers start at once and all create the tables: no process may fail on the race."""
    import subprocess

    from conftest import PG_URL_BASE, create_pg_database, drop_pg_database

    code = ("import sys, time; from lyco_api.db import init_db, make_engine; e = make_engine(sys.argv[1]); "
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); init_db(e); init_db(e); print('ok')")
    pg_name = create_pg_database("initrace")
    try:
        for url in (f"sqlite:///{tmp_path / 'race.db'}", PG_URL_BASE + pg_name):
            start_at = str(time.time() + 1.5)
            procs = [subprocess.Popen([sys.executable, "-c", code, url, start_at], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(4)]
            results = [p.communicate(timeout=60) for p in procs]
            assert [p.returncode for p in procs] == [0] * 4, [err[-500:] for _, err in results]
            eng = make_engine(url)
            with Session(bind=eng) as s:
                assert s.scalar(select(func.count()).select_from(Job)) == 0  # the tables exist
            eng.dispose()
    finally:
        drop_pg_database(pg_name)


def test_unique_constraints(engine: Engine) -> None:
    uid = _user(engine)
    with session_scope(engine) as s:
        s.add(ApiKey(user_id=uid, prefix="dup00001", key_hash="a" * 64, scopes=["read"]))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(ApiKey(user_id=uid, prefix="dup00002", key_hash="a" * 64, scopes=["read"]))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add_all([User(name="same"), User(name="same")])


def test_events_are_ordered_per_job(engine: Engine) -> None:
    uid = _user(engine)
    jid = _job_in(engine, uid, "queued")
    other = _job_in(engine, uid, "queued")
    with session_scope(engine) as s:
        for i in range(5):
            add_event(s, jid, "progress", {"step": i})
            add_event(s, other, "progress", {"step": 100 + i})
    with Session(bind=engine) as s:
        evs = events_after(s, jid)
        assert [e.kind for e in evs] == ["state"] + ["progress"] * 5
        assert [e.data.get("step") for e in evs[1:]] == [0, 1, 2, 3, 4]
        assert all(a.id < b.id for a, b in itertools.pairwise(evs))
        later = events_after(s, jid, after_id=evs[3].id)
        assert [e.data["step"] for e in later] == [3, 4]


# ---- job state machine ----------------------------------------------------------------------------------------


def test_transition_matrix(engine: Engine) -> None:
    uid = _user(engine)
    legal: set[tuple[str, str]] = set()
    for src in STATES:
        for dst in STATES:
            jid = _job_in(engine, uid, src)
            with Session(bind=engine) as s:
                job = s.get(Job, jid)
                assert job is not None
                assert job.state == src
                if (src, dst) in EXPECTED_LEGAL:
                    transition(s, job, dst)
                    s.commit()
                    legal.add((src, dst))
                    continue
                with pytest.raises(IllegalTransitionError, match=f"from {src} to {dst}"):
                    transition(s, job, dst)
                s.rollback()
                assert s.get(Job, jid).state == src  # type: ignore[union-attr]
    assert legal == EXPECTED_LEGAL


def test_attempts_timestamps_and_events(engine: Engine) -> None:
    uid = _user(engine)
    with session_scope(engine) as s:
        job = create_job(s, uid, "train", {}, max_attempts=2)
        assert job.started_at is None
        assert job.finished_at is None
        transition(s, job, "running", worker="w1")
        assert job.attempts == 1
        assert job.worker == "w1"
        assert job.started_at is not None
        first_start = job.started_at
        transition(s, job, "queued")  # the worker was lost: redelivery
        assert job.worker is None
        assert job.state == "queued"
        assert job.attempts == 1
        transition(s, job, "running", worker="w2")
        assert job.attempts == 2
        assert job.started_at is not None
        assert job.started_at >= first_start
        s.execute(update(Job).where(Job.id == job.id).values(started_at=job.started_at - timedelta(seconds=42)))
        s.refresh(job)
        transition(s, job, "succeeded", result={"files": ["x"]}, progress={"step": 10, "total": 10})
        jid = job.id
    with Session(bind=engine) as s:
        job = s.get(Job, jid)
        assert job is not None
        assert job.state == "succeeded"
        assert job.result == {"files": ["x"]}
        assert job.progress == {"step": 10, "total": 10}
        assert job.finished_at is not None
        assert job.started_at is not None
        assert job.duration_s == pytest.approx((job.finished_at - job.started_at).total_seconds(), abs=1e-3)
        assert 42 <= job.duration_s < 60
        evs = [(e.kind, e.data.get("state"), e.data.get("from")) for e in events_after(s, jid)]
        assert evs == [("state", "queued", None), ("state", "running", "queued"), ("state", "queued", "running"),
                       ("state", "running", "queued"), ("state", "succeeded", "running")]
        assert [e.data.get("worker") for e in events_after(s, jid) if e.data.get("state") == "running"] == ["w1",
                                                                                                          "w2"]


def test_create_and_transition_validate_arguments(engine: Engine) -> None:
    uid = _user(engine)
    with session_scope(engine) as s:
        with pytest.raises(InvalidConfigError, match="kind"):
            create_job(s, uid, "bake-a-cake", {})
        with pytest.raises(InvalidConfigError, match="queue"):
            create_job(s, uid, "op", {}, "tpu")
        job = create_job(s, uid, "op", {"op": "inspect"})
        assert job.queue == "cpu"
        with pytest.raises(InvalidConfigError, match="attempts"):
            transition(s, job, "running", attempts=5)
        with pytest.raises(InvalidConfigError, match="paused"):
            transition(s, job, "paused")


def test_cancel_queued_running_and_finished(engine: Engine) -> None:
    uid = _user(engine)
    queued, running, done = (_job_in(engine, uid, st) for st in ("queued", "running", "succeeded"))
    with session_scope(engine) as s:
        job = request_cancel(s, s.get(Job, queued))  # type: ignore[arg-type]
        assert job.state == "cancelled"
        assert job.cancel_requested
        assert job.finished_at is not None
        job = request_cancel(s, s.get(Job, running))  # type: ignore[arg-type]
        assert job.state == "running"
        assert job.cancel_requested
        with pytest.raises(IllegalTransitionError, match="succeeded"):
            request_cancel(s, s.get(Job, done))  # type: ignore[arg-type]
    with Session(bind=engine) as s:
        assert s.get(Job, queued).state == "cancelled"  # type: ignore[union-attr]
        r = s.get(Job, running)
        assert r is not None
        assert r.state == "running"
        assert r.cancel_requested
        assert [e.kind for e in events_after(s, running)][-1] == "cancel_requested"
        # the worker notices the flag and ends the job cancelled
        transition(s, r, "cancelled")
        s.commit()
        assert r.duration_s is not None


def test_retry_resets_attempts(engine: Engine) -> None:
    uid = _user(engine)
    jid = _job_in(engine, uid, "failed")
    with session_scope(engine) as s:
        job = s.get(Job, jid)
        assert job is not None
        transition_err = "boom"
        job.error = transition_err
        s.flush()
        retry_job(s, job)
    with Session(bind=engine) as s:
        job = s.get(Job, jid)
        assert job is not None
        assert (job.state, job.attempts, job.error, job.finished_at, job.cancel_requested) == ("queued", 0, None,
                                                                                              None, False)
        with pytest.raises(IllegalTransitionError, match="queued"):
            retry_job(s, job)


def test_progress_snapshot(engine: Engine) -> None:
    uid = _user(engine)
    jid = _job_in(engine, uid, "running")
    with session_scope(engine) as s:
        job = s.get(Job, jid)
        assert job is not None
        update_progress(s, job, {"step": 3, "total": 10, "loss": 0.25})
        update_progress(s, job, {"step": 4, "total": 10, "loss": 0.2}, event=False)
    with Session(bind=engine) as s:
        assert s.get(Job, jid).progress == {"step": 4, "total": 10, "loss": 0.2}  # type: ignore[union-attr]
        assert [e.data for e in events_after(s, jid) if e.kind == "progress"] == [{"step": 3, "total": 10,
                                                                                   "loss": 0.25}]


def test_stale_job_object_cannot_double_transition(engine: Engine) -> None:
    """The API loaded a queued job; a worker starts it meanwhile; the API's cancel must not overwrite running."""
    uid = _user(engine)
    jid = _job_in(engine, uid, "queued")
    api = Session(bind=engine)
    stale = api.get(Job, jid)
    assert stale is not None
    assert stale.state == "queued"
    with session_scope(engine) as worker:
        transition(worker, worker.get(Job, jid), "running", worker="w")  # type: ignore[arg-type]
    with pytest.raises(IllegalTransitionError, match="concurrently"):
        transition(api, stale, "cancelled")
    assert stale.state == "running"  # refreshed from the database
    api.rollback()
    job = request_cancel(api, api.get(Job, jid))  # type: ignore[arg-type]
    api.commit()
    assert job.state == "running"
    assert job.cancel_requested
    api.close()


def test_concurrent_start_on_postgres_has_one_winner(pg_engine: Engine) -> None:
    uid = _user(pg_engine)
    jid = _job_in(pg_engine, uid, "queued")
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def start(i: int) -> None:
        with Session(bind=pg_engine) as s:
            job = s.get(Job, jid)
            assert job is not None
            barrier.wait()
            try:
                transition(s, job, "running", worker=f"w{i}")
                s.commit()
                outcomes.append("won")
            except IllegalTransitionError:
                s.rollback()
                outcomes.append("lost")

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]
    with Session(bind=pg_engine) as s:
        job = s.get(Job, jid)
        assert job is not None
        assert job.attempts == 1
        assert job.state == "running"
        assert sum(1 for e in events_after(s, jid) if e.data.get("state") == "running") == 1


# ---- file store -----------------------------------------------------------------------------------------------


def test_store_add_bytes_path_and_delete(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    payload = bytes(range(256)) * 5000
    src = tmp_path / "src.bin"
    src.write_bytes(payload[::-1])
    with session_scope(engine) as s:
        a = store.add(s, uid, "adapter", payload, "my lora.safetensors", {"k": 1})
        b = store.add(s, uid, "other", src, "../../evil/name.bin")
        c = store.add(s, uid, "report", io.BytesIO(b"hello"), "r.txt")
        ids = (a.id, b.id, c.id)
    assert src.exists()  # copied, not moved
    with Session(bind=engine) as s:
        a, b, c = (s.get(StoredFile, i) for i in ids)  # type: ignore[assignment]
        assert a.sha256 == hashlib.sha256(payload).hexdigest()
        assert a.size == len(payload)
        assert store.path(a).read_bytes() == payload
        assert store.path(a).name == "my_lora.safetensors"
        assert a.name == "my lora.safetensors"
        assert a.meta == {"k": 1}
        assert not Path(a.path).is_absolute()
        assert b.sha256 == hashlib.sha256(payload[::-1]).hexdigest()
        assert store.path(b).is_relative_to(store.files_dir)
        assert store.path(b).name == "name.bin"
        assert store.path(c).read_bytes() == b"hello"
        assert c.size == 5
        assert store.verify(a)
        pa = store.path(a)
        pa.write_bytes(b"tampered")
        assert not store.verify(a)
        store.delete(s, a)
        s.commit()
        assert not pa.exists()
        assert not pa.parent.exists()
        assert s.get(StoredFile, ids[0]) is None
    assert list(store.tmp_dir.iterdir()) == []


def test_store_move(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    staged = store.staging_path(".safetensors")
    staged.write_bytes(b"x" * 1000)
    with session_scope(engine) as s:
        f = store.add(s, uid, "adapter", staged, "out.safetensors", move=True)
        assert not staged.exists()
        assert store.path(f).read_bytes() == b"x" * 1000
        assert f.sha256 == hashlib.sha256(b"x" * 1000).hexdigest()


class _Source(io.RawIOBase):
    """A stream of ``n`` chunks that runs ``check`` before the last chunk and can fail instead of ending."""

    def __init__(self, n: int, check: Any, fail: bool) -> None:
        self.n, self.i, self.check, self.fail = n, 0, check, fail

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.i += 1
        if self.i == self.n:
            self.check()
            if self.fail:
                raise OSError("client went away")
        return b"" if self.i > self.n else b"z" * 4096


def test_store_registers_only_complete_files(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    seen: list[tuple[int, int, int]] = []

    with Session(bind=engine) as s:
        def check() -> None:  # mid-copy: no row (the session autoflushes), no final file, one temp file
            rows = len(s.scalars(select(StoredFile).where(StoredFile.user_id == uid)).all())
            seen.append((rows, len([p for p in store.files_dir.rglob("*") if p.is_file()]),
                         len(list(store.tmp_dir.iterdir()))))

        with pytest.raises(OSError, match="went away"):
            store.add(s, uid, "dataset", _Source(10, check, fail=True), "d.zip")
        assert s.scalars(select(StoredFile).where(StoredFile.user_id == uid)).all() == []
        assert list(store.tmp_dir.iterdir()) == []
        assert [p for p in store.files_dir.rglob("*") if p.is_file()] == []
        f = store.add(s, uid, "dataset", _Source(10, check, fail=False), "d.zip")
        s.commit()
        assert f.size == 10 * 4096
        assert store.path(f).stat().st_size == 10 * 4096
    assert seen == [(0, 0, 1), (0, 0, 1)]


def test_store_size_limit(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    src = tmp_path / "big.bin"
    src.write_bytes(b"b" * 3000)
    with session_scope(engine) as s:
        for source in (b"b" * 3000, io.BytesIO(b"b" * 3000), src):
            with pytest.raises(TooLargeError, match="2048"):
                store.add(s, uid, "adapter", source, "big.bin", max_bytes=2048)
        with pytest.raises(TooLargeError):
            store.add(s, uid, "adapter", src, "big.bin", max_bytes=2048, move=True)
        assert src.exists()
        ok = store.add(s, uid, "adapter", b"b" * 2048, "fits.bin", max_bytes=2048)
        assert ok.size == 2048
        assert s.scalars(select(StoredFile.name).where(StoredFile.user_id == uid)).all() == ["fits.bin"]
    assert list(store.tmp_dir.iterdir()) == []


def test_store_failed_registration_leaves_no_file(pg_engine: Engine, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    with Session(bind=pg_engine) as s:
        with pytest.raises(IntegrityError):
            store.add(s, 987654321, "adapter", b"data", "orphan.bin")  # no such user: the FK rejects the row
        s.rollback()
    assert [p for p in store.files_dir.rglob("*") if p.is_file()] == []
    assert list(store.tmp_dir.iterdir()) == []


def test_store_rejects_bad_rows_and_kinds(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    (tmp_path / "secret.txt").write_text("s")
    with session_scope(engine) as s:
        with pytest.raises(InvalidConfigError, match="kind"):
            store.add(s, uid, "weights", b"x", "x")
        evil = StoredFile(id="e" * 36, user_id=uid, kind="other", name="x", path="../secret.txt", size=1,
                          sha256="0" * 64)
        with pytest.raises(CorruptFileError, match="outside"):
            store.path(evil)
        gone = store.add(s, uid, "other", b"x", "x")
        store.path(gone).unlink()
        with pytest.raises(NotFoundError, match="missing"):
            store.path(gone)
        store.delete(s, gone)  # a missing file on disk does not block deleting the row


def test_store_sweep(engine: Engine, tmp_path: Path) -> None:
    uid = _user(engine)
    store = FileStore(tmp_path / "store")
    with session_scope(engine) as s:
        kept = store.add(s, uid, "other", b"keep", "keep.txt")
        orphan = store.files_dir / "ab" / ("ab" + "0" * 34) / "orphan.txt"
        orphan.parent.mkdir(parents=True)
        orphan.write_text("o")
        stale_tmp = store.staging_path()
        stale_tmp.write_text("t")
        assert store.sweep(s, older_than_s=3600) == []  # everything is fresh
        removed = store.sweep(s, older_than_s=-1)
        assert sorted(removed) == sorted([orphan, stale_tmp])
        assert store.path(kept).read_bytes() == b"keep"


@pytest.mark.parametrize(("name", "expected"), [
    ("../../etc/passwd", "passwd"), ("C:\\x\\y.safetensors", "y.safetensors"), ("..", "file"),
    ("a b$c.txt", "a_b_c.txt"), (".hidden", "hidden"), ("x" * 300 + ".bin", "x" * 196 + ".bin"),
])
def test_safe_name(name: str, expected: str) -> None:
    assert safe_name(name) == expected


# ---- queue ----------------------------------------------------------------------------------------------------


def test_enqueue_puts_only_the_job_id_on_redis(make_settings: Any, pg_engine: Engine, redis_url: str) -> None:
    settings = make_settings()
    uid = _user(pg_engine)
    with session_scope(pg_engine) as s:
        gpu_job = create_job(s, uid, "train", {"secret_param": "not-on-the-broker"})
        cpu_job = create_job(s, uid, "op", {"op": "inspect"})
    r = redis.Redis.from_url(redis_url)
    r.delete("gpu", "cpu")
    enqueue(gpu_job, settings)
    enqueue(cpu_job, settings)
    assert r.llen("gpu") == 1
    assert r.llen("cpu") == 1
    msg = json.loads(r.lpop("gpu"))  # type: ignore[arg-type]
    assert msg["headers"]["task"] == "lyco.run_job"
    args, kwargs, _embed = json.loads(base64.b64decode(msg["body"]))
    assert args == [gpu_job.id]
    assert kwargs == {}
    assert b"not-on-the-broker" not in json.dumps(msg).encode()
    cpu_msg = json.loads(r.lpop("cpu"))  # type: ignore[arg-type]
    assert json.loads(base64.b64decode(cpu_msg["body"]))[0] == [cpu_job.id]
    r.close()


def test_enqueue_and_ping_with_broker_down(make_settings: Any, pg_engine: Engine) -> None:
    settings = make_settings(broker_url=DEAD_BROKER)
    assert ping_broker(make_settings()) is True
    t0 = time.monotonic()
    assert ping_broker(settings, timeout_s=1.0) is False
    assert time.monotonic() - t0 < 10
    uid = _user(pg_engine)
    with session_scope(pg_engine) as s:
        job = create_job(s, uid, "train", {})
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:1"):
        enqueue(job, settings)
    assert time.monotonic() - t0 < 30


# ---- app: health, readiness, metrics, errors ------------------------------------------------------------------


def test_health_ready_and_openapi(service: Service) -> None:
    c = service.client
    assert c.get("/api/v1/health").json() == {"status": "ok"}
    r = c.get("/api/v1/ready")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "database": "ok", "broker": "ok"}
    spec = c.get("/api/v1/openapi.json").json()
    ops = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert {"health-health", "health-ready", "health-metrics", "admin-admin_create_key", "auth-me"} <= ops


def test_ready_is_503_without_broker_or_database(make_settings: Any, sqlite_url: str) -> None:
    no_broker = create_app(make_settings(broker_url=DEAD_BROKER))
    with TestClient(no_broker) as c:
        r = c.get("/api/v1/ready")
        assert r.status_code == 503
        assert r.json() == {"status": "not ready", "database": "ok",
                                                     "broker": "unreachable"}
        assert c.get("/api/v1/health").status_code == 200  # liveness does not depend on either
    no_db = create_app(make_settings(database_url="postgresql://postgres@127.0.0.1:1/none"), init=False)
    with TestClient(no_db) as c:
        r = c.get("/api/v1/ready")
        assert r.status_code == 503
        assert r.json()["database"] == "unreachable"
        assert r.json()["broker"] == "ok"


def _metrics(c: TestClient) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = c.get("/api/v1/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_from_the_database(make_settings: Any, sqlite_url: str) -> None:
    app = create_app(make_settings(database_url=sqlite_url))
    engine: Engine = app.state.engine
    uid = _user(engine)
    durations = [0.5, 3.0, 20.0, 100.0]
    with session_scope(engine) as s:
        for _ in range(3):
            create_job(s, uid, "train", {})
        create_job(s, uid, "op", {})
        for i, d in enumerate(durations):
            job = create_job(s, uid, "train", {})
            transition(s, job, "running")
            transition(s, job, "failed" if i % 2 else "succeeded", error="x" if i % 2 else None)
            s.execute(update(Job).where(Job.id == job.id).values(duration_s=d))
        op = create_job(s, uid, "op", {})
        transition(s, op, "running")
        transition(s, op, "failed", error="bad")
        s.execute(update(Job).where(Job.id == op.id).values(duration_s=2.0))
    with TestClient(app) as c:
        c.get("/api/v1/health")
        m = _metrics(c)
    assert m["lyco_queue_depth"] == {(("queue", "gpu"),): 3.0, (("queue", "cpu"),): 1.0}
    assert m["lyco_jobs"][(("kind", "train"), ("state", "failed"))] == 2.0
    assert m["lyco_jobs"][(("kind", "train"), ("state", "succeeded"))] == 2.0
    assert m["lyco_job_failures_total"][(("kind", "train"), ("queue", "gpu"))] == 2.0
    assert m["lyco_job_failures_total"][(("kind", "op"), ("queue", "cpu"))] == 1.0
    buckets = {dict(k)["le"]: v for k, v in m["lyco_job_duration_seconds_bucket"].items()
               if dict(k)["kind"] == "train"}
    for le, v in buckets.items():
        bound = float("inf") if le == "+Inf" else float(le)
        assert v == sum(1 for d in durations if d <= bound), le
    assert m["lyco_job_duration_seconds_count"][(("kind", "train"), ("queue", "gpu"))] == 4.0
    assert m["lyco_job_duration_seconds_sum"][(("kind", "train"), ("queue", "gpu"))] == pytest.approx(123.5)
    assert m["lyco_job_duration_seconds_count"][(("kind", "op"), ("queue", "cpu"))] == 1.0
    health = (("method", "GET"), ("route", "/api/v1/health"), ("status", "200"))
    assert m["lyco_http_requests_total"][health] >= 1.0


def _erroring_app(make_settings: Any, sqlite_url: str) -> FastAPI:
    app = create_app(make_settings(database_url=sqlite_url))
    demo = APIRouter()
    errors: dict[str, Exception] = {
        "notfound": NotFoundError("adapter 'x.safetensors' not found\n  more detail"),
        "exists": FileExistsLycoError("out.safetensors exists; pass overwrite"),
        "invalid": InvalidConfigError("option 'rank' must be > 0"),
        "illegal": IllegalTransitionError("job j cannot go from succeeded to running"),
        "toolarge": TooLargeError("upload over the limit"),
        "broker": BrokerUnavailableError("broker down"),
        "crash": RuntimeError("secret internal state at /srv/private/path"),
    }

    @demo.get("/boom/{what}")
    def boom(what: str) -> None:
        raise errors[what]

    app.include_router(demo, prefix="/api/v1")
    return app


@pytest.mark.parametrize(("what", "status", "detail"), [
    ("notfound", 404, "adapter 'x.safetensors' not found"),
    ("exists", 409, "out.safetensors exists; pass overwrite"),
    ("invalid", 400, "option 'rank' must be > 0"),
    ("illegal", 409, "job j cannot go from succeeded to running"),
    ("toolarge", 413, "upload over the limit"),
    ("broker", 503, "broker down"),
    ("crash", 500, "internal server error"),
])
def test_error_handlers(make_settings: Any, sqlite_url: str, caplog: pytest.LogCaptureFixture,
                        what: str, status: int, detail: str) -> None:
    app = _erroring_app(make_settings, sqlite_url)
    with caplog.at_level(logging.ERROR, logger="lyco_api"), TestClient(app, raise_server_exceptions=False) as c:
        r = c.get(f"/api/v1/boom/{what}")
    assert r.status_code == status
    assert r.json() == {"detail": detail}
    assert "Traceback" not in r.text
    assert "/srv/private" not in r.text
    if what == "crash":
        assert any(rec.exc_info and "secret internal state" in str(rec.exc_info[1]) for rec in caplog.records)


def test_routers_mounted_only_when_they_import(make_settings: Any, sqlite_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("lyco_api.routes.zz_fake")
    router = APIRouter(prefix="/zz", tags=["zz"])

    @router.get("/ping")
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    fake.router = router  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lyco_api.routes.zz_fake", fake)
    monkeypatch.setattr(app_module, "ROUTER_MODULES", ("health", "zz_fake", "zz_not_written_yet"))
    app = create_app(make_settings(database_url=sqlite_url))
    assert app.state.routers == ["health", "zz_fake"]
    with TestClient(app) as c:
        assert c.get("/api/v1/zz/ping").json() == {"pong": "yes"}
        assert "zz-ping" in {op["operationId"] for p in c.get("/api/v1/openapi.json").json()["paths"].values()
                             for op in p.values()}


def test_terminal_states() -> None:
    assert frozenset({"succeeded", "failed", "cancelled"}) == TERMINAL
    assert JobEvent.__tablename__ == "job_events"


def test_idle_pooled_connection_that_died_is_replaced(pg_engine: Engine) -> None:
    """Pooled connections are pinged only after PING_IDLE_S idle: one the server closed meanwhile (a database
    restart) is found dead at checkout and replaced, and the caller does not notice."""
    with pg_engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:  # outside the pool: the pool keeps one connection
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):
            if not admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
                break
            time.sleep(0.05)
    records = list(pg_engine.pool._pool.queue)  # type: ignore[attr-defined]
    assert len(records) == 1
    records[0].info["lyco_idle_since"] = time.monotonic() - 60  # idle for a minute: checked at checkout
    with pg_engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
