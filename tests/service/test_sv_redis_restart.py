"""A broker restart while a job is queued: the job still runs.

Uses a private redis-server (no persistence, so the restart really loses the queued message) on a free port, the
module's PostgreSQL database, the API in process, and a real worker subprocess started after the restart: the
worker's start-up reconcile sends the messages of jobs the database still has ``queued``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ADMIN_KEY, build_settings
from fastapi.testclient import TestClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(folder)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(host="127.0.0.1", port=port)
    end = time.monotonic() + 20
    while True:
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                return p
        assert p.poll() is None, "redis-server exited"
        assert time.monotonic() < end, "redis-server did not start"
        time.sleep(0.05)


def _kill(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, list[subprocess.Popen[bytes]]]]:
    if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    procs = [_start_redis(port, tmp_path)]
    yield port, procs
    for p in procs:
        _kill(p)


def test_job_queued_before_a_broker_restart_still_runs(
    tmp_path: Path, pg_url: str, private_redis: tuple[int, list[subprocess.Popen[bytes]]]
) -> None:
    from lyco_api.app import create_app
    from lyco_trainer.models import write_tiny_pipeline

    port, procs = private_redis
    broker = f"redis://127.0.0.1:{port}/0"
    data_dir = tmp_path / "data"
    write_tiny_pipeline(data_dir / "models" / "tiny-sd1", "sd1")
    settings = build_settings(data_dir, database_url=pg_url, broker_url=broker, admin_key=ADMIN_KEY)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(settings)) as client:
        r = client.post("/api/v1/jobs/generate", headers=headers, json={
            "base": "tiny-sd1", "prompts": ["circle, shape"], "seeds": [3], "steps": 2, "width": 32, "height": 32,
            "device": "cpu",
        })
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        broker_client = redis.Redis(host="127.0.0.1", port=port)
        assert broker_client.llen("gpu") == 1  # the message is in Redis, only there

        _kill(procs[0])  # the broker goes away with the message (no persistence)...
        procs.append(_start_redis(port, tmp_path))  # ...and comes back empty
        assert broker_client.llen("gpu") == 0
        assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()["state"] == "queued"

        env = {k: v for k, v in os.environ.items() if not k.startswith("LYCO_")}
        env.update({"LYCO_DATABASE_URL": pg_url, "LYCO_BROKER_URL": broker, "LYCO_DATA_DIR": str(data_dir),
                    "LYCO_ADMIN_KEY": ADMIN_KEY, "OMP_NUM_THREADS": "1", "LYCO_PROGRESS": "0"})
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen([sys.executable, "-m", "lyco_worker.cli", "--queues", "gpu,cpu", "--concurrency",
                                   "1", "--hostname", "restart@test"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        end = time.monotonic() + 180
        job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < end, f"job still {job['state']}\n" + (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.3)
            job = client.get(f"/api/v1/jobs/{job_id}", headers=headers).json()
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1
        assert [f["kind"] for f in job["files"]] == ["image"]
