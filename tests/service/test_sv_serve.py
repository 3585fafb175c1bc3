"""``lyco serve``: the API and one worker as real processes, with no server (SQLite + filesystem broker) and with
the configured PostgreSQL/Redis; clean SIGINT/SIGTERM shutdown and a worker that dies.

The helpers here (free port, clean environment, a running server process) are also used by test_sv_compose.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis
from adapter_files import make_adapter
from PIL import Image

from lyco_api.serve import FS_POLLING_INTERVAL_S, configure, worker_command

ADMIN_KEY = "serve-test-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


# ------------------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any LYCO_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYCO_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


@dataclass
class Proc:
    """A started server subprocess, its base URL and its log file."""

    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def wait_http(proc: Proc, path: str, timeout_s: float, status: int = 200) -> httpx.Response:
    """Poll ``path`` until it answers ``status``; fail with the log tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            pytest.fail(f"server exited with {proc.popen.returncode} before {path} answered:\n{proc.tail()}")
        try:
            r = httpx.get(proc.url + path, timeout=5)
            if r.status_code == status:
                return r
            last = r.status_code
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.3)
    pytest.fail(f"{path} did not answer {status} within {timeout_s} s (last: {last}):\n{proc.tail()}")


def descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def kill_tree(procs: Sequence[psutil.Process]) -> None:
    """SIGKILL processes this test started (by pid), ignoring those already gone."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def running(cmd: list[str], *, port: int, cwd: Path, env: dict[str, str], log: Path,
            ready_path: str = "/api/v1/health", timeout_s: float = 90) -> Iterator[Proc]:
    """Start ``cmd`` (a server listening on ``port``), wait for ``ready_path``, and always clean up its tree."""
    with open(log, "wb") as out:
        popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc(popen, f"http://127.0.0.1:{port}", log)
    tree: list[psutil.Process] = []
    try:
        wait_http(proc, ready_path, timeout_s)
        tree = descendants(popen.pid)
        yield proc
    finally:
        tree += descendants(popen.pid)
        if popen.poll() is None:
            popen.kill()
            popen.wait(10)
        kill_tree(tree)


def serve_cmd(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "lyco_api.serve", "--port", str(port), "--log-level", "warning", *args]


def wait_job(proc: Proc, job_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = httpx.get(f"{proc.url}/api/v1/jobs/{job_id}", headers=AUTH, timeout=5)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.3)
    pytest.fail(f"job {job_id} still {job.get('state')} after {timeout_s} s:\n{proc.tail()}")


def worker_children(proc: Proc, timeout_s: float = 60) -> list[psutil.Process]:
    """The worker subprocess(es) of a ``lyco serve`` process (direct children running ``lyco_worker.cli``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        kids = [c for c in descendants(proc.popen.pid) if c.ppid() == proc.popen.pid]
        if kids:
            return kids
        time.sleep(0.2)
    pytest.fail(f"no worker child of lyco serve:\n{proc.tail()}")


@pytest.fixture
def restore_environ() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------------------------------------- tests
@pytest.mark.usefixtures("restore_environ")
def test_configure_embedded_defaults_and_a_real_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration → SQLite in the data dir and the filesystem broker; a task sent through the API's own
    client lands as a message file in the queue folder; a configured database/broker is left alone."""
    from lyco_api.queue import celery_client

    monkeypatch.chdir(tmp_path)  # no .env here
    data = tmp_path / "data"
    s = configure(data)
    assert s.data_dir == data.resolve()
    assert s.database_url == f"sqlite:///{data.resolve() / 'lyco.db'}"
    assert s.broker_url == "filesystem://"
    qdir = data.resolve() / "broker" / "queue"
    assert s.broker_transport_options["data_folder_in"] == str(qdir)
    assert s.broker_transport_options["data_folder_out"] == str(qdir)
    assert s.broker_transport_options["polling_interval"] == FS_POLLING_INTERVAL_S
    assert json.loads(os.environ["LYCO_BROKER_TRANSPORT_OPTIONS"]) == s.broker_transport_options

    celery_client(s).send_task("lyco.run_job", args=["job-123"], queue="cpu")
    msgs = list(qdir.iterdir())
    assert len(msgs) == 1
    body = json.loads(msgs[0].read_text())
    assert body["headers"]["task"] == "lyco.run_job"
    assert body["properties"]["delivery_info"]["routing_key"] == "cpu"

    # the worker argv runs `lyco worker` in this interpreter with the queues given
    cmd = worker_command("gpu,cpu", 2)
    assert cmd[0] == sys.executable
    assert cmd[-4:] == ["--queues", "gpu,cpu", "--concurrency", "2"]

    # configured: kept as given, no broker folder is made
    os.environ.pop("LYCO_BROKER_TRANSPORT_OPTIONS")
    monkeypatch.setenv("LYCO_BROKER_URL", "redis://127.0.0.1:6379/7")
    monkeypatch.setenv("LYCO_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/x")
    s2 = configure(tmp_path / "data2")
    assert (s2.broker_url, s2.database_url) == ("redis://127.0.0.1:6379/7",
                                               "postgresql+psycopg://postgres@127.0.0.1:5432/x")
    assert s2.broker_transport_options == {}
    assert not (tmp_path / "data2" / "broker").exists()


def test_serve_embedded_runs_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    """`lyco serve` with no configuration: health/ready, the env admin key, a generation job (gpu queue) and an
    adapter `inspect` (cpu queue) run by the worker subprocess through the filesystem broker, then SIGINT stops API
    and worker with status 0."""
    from lyco_trainer.models import write_tiny_pipeline

    data = tmp_path / "data"
    write_tiny_pipeline(data / "models" / "tiny")
    port = free_port()
    env = clean_env(LYCO_ADMIN_KEY=ADMIN_KEY)
    with running(serve_cmd(port, "--data-dir", str(data), "--worker-grace", "20"), port=port, cwd=tmp_path,
                 env=env, log=tmp_path / "serve.log") as proc:
        ready = wait_http(proc, "/api/v1/ready", 30).json()
        assert ready == {"status": "ready", "database": "ok", "broker": "ok"}
        me = httpx.get(proc.url + "/api/v1/me", headers=AUTH, timeout=5).json()
        assert me["is_admin"] is True
        assert httpx.get(proc.url + "/api/v1/me", timeout=5).status_code == 401
        assert (data / "lyco.db").is_file()
        assert (data / "broker" / "queue").is_dir()

        spec = {"base": "tiny", "prompts": ["a red square"], "seeds": [3], "steps": 2, "width": 32, "height": 32,
                "device": "cpu"}
        r = httpx.post(proc.url + "/api/v1/jobs/generate", json=spec, headers=AUTH, timeout=10)
        assert r.status_code == 202, r.text
        job = wait_job(proc, r.json()["id"], 90)
        assert job["state"] == "succeeded", (job, proc.tail())
        worker = worker_children(proc)[0]
        # the job ran in the worker subprocess (a child of it), not in the API process
        assert job["worker"]
        assert f"#{proc.popen.pid}" not in job["worker"]
        with sqlite3.connect(data / "lyco.db") as db:
            rows = db.execute("SELECT path FROM files WHERE kind = 'image'").fetchall()
        assert len(rows) == 1
        with Image.open(data / rows[0][0]) as im:
            assert im.size == (32, 32)

        # an adapter upload and `inspect` (a cpu-queue job) through the same embedded worker
        adapter = make_adapter(tmp_path / "a.safetensors", "lora", seed=3)
        r = httpx.post(proc.url + "/api/v1/files/adapters", headers=AUTH, timeout=30,
                       files={"file": (adapter.name, adapter.read_bytes())})
        assert r.status_code == 201, r.text
        r = httpx.post(proc.url + "/api/v1/ops/inspect", json={"file_id": r.json()["id"]}, headers=AUTH, timeout=60)
        assert r.status_code == 200, (r.text, proc.tail())
        report = r.json()["report"]
        raw = adapter.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        keys = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
        assert report["module_count"] == len({k.split(".")[0] for k in keys}) == 291
        assert report["payload_sha256"] == hashlib.sha256(raw[8 + n:]).hexdigest()
        assert not list((data / "broker" / "queue").iterdir())  # every message was consumed

        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(60) == 0, proc.tail()
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        with pytest.raises(httpx.ConnectError):
            httpx.get(proc.url + "/api/v1/health", timeout=2)


def test_serve_stops_when_its_worker_dies(tmp_path: Path) -> None:
    """A worker killed under `lyco serve` takes the API down with exit status 1 (no API without a worker)."""
    port = free_port()
    with running(serve_cmd(port, "--data-dir", str(tmp_path / "data"), "--queues", "cpu"), port=port,
                 cwd=tmp_path, env=clean_env(), log=tmp_path / "serve.log") as proc:
        worker = worker_children(proc)[0]
        kill_tree([*worker.children(recursive=True), worker])
        assert proc.popen.wait(30) == 1, proc.tail()


def test_serve_uses_configured_postgres_and_redis(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    """LYCO_DATABASE_URL / LYCO_BROKER_URL set: `lyco serve --no-worker` keeps its jobs in PostgreSQL and sends
    them through Redis (no SQLite file, no broker folder); SIGTERM stops it with status 0."""
    port = free_port()
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    from lyco_trainer.models import write_tiny_pipeline

    write_tiny_pipeline(data / "models" / "tiny")
    env = clean_env(LYCO_ADMIN_KEY=ADMIN_KEY, LYCO_DATABASE_URL=pg_url, LYCO_BROKER_URL=redis_url)
    with running(serve_cmd(port, "--data-dir", str(data), "--no-worker"), port=port, cwd=tmp_path, env=env,
                 log=tmp_path / "serve.log", ready_path="/api/v1/ready") as proc:
        assert not [c for c in descendants(proc.popen.pid) if c.ppid() == proc.popen.pid]  # --no-worker
        spec = {"base": "tiny", "prompts": ["x"], "steps": 1, "width": 32, "height": 32}
        r = httpx.post(proc.url + "/api/v1/jobs/generate", json=spec, headers=AUTH, timeout=10)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        with psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql")) as conn:
            state = conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
        assert state == ("queued",)
        rc = redis.Redis.from_url(redis_url)
        messages = rc.lrange("gpu", 0, -1)
        rc.close()
        assert len(messages) == 1
        msg = json.loads(messages[0])
        assert msg["headers"]["task"] == "lyco.run_job"
        assert json.loads(base64.b64decode(msg["body"]))[0] == [job_id]  # the broker carries only the job id
        assert not (data / "lyco.db").exists()
        assert not (data / "broker").exists()
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(30) == 0, proc.tail()
