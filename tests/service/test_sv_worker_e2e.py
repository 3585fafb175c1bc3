"""End to end with real processes: uvicorn (the API), Celery worker subprocesses (``python -m lyco_worker.cli``),
Redis (DB 6) and PostgreSQL.

A tiny training job streams its progress over SSE and yields an adapter that loads in Lyco; a queued job that is
cancelled never starts and a running one stops with a resumable state; the worker is killed with SIGKILL mid-training,
a new worker reconciles the job and finishes it from the newest saved state (fewer steps re-done); a generation job
yields images and an evaluation job a report. (A Redis restart while a job is queued is not tested here.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from shapes_dataset import write_dataset

from lyco_api.settings import Settings

ADMIN_KEY = "lyco_0b0b0b0b_" + "B" * 40


def train_body(steps: int, state_every: int) -> dict[str, Any]:
    return {
        "model": {"base": "tiny-sd1"},
        "network": {"algo": "lora", "preset": "attn-mlp", "dim": 4, "alpha": 2.0},
        "data": {"root": "shapes-data", "resolution": 32, "buckets": False},
        "train": {"batch_size": 2, "epochs": 500, "max_steps": steps, "unet_lr": 1e-3, "seed": 3},
        "output": {"name": "tiny", "dtype": "fp32", "tensorboard": False, "save_every_epochs": None,
                   "state_every_steps": state_every},
        "sample": {"prompts": []},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    base_url: str
    settings: Settings
    env: dict[str, str]
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker: subprocess.Popen[bytes] | None = None

    @property
    def h(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"worker-{name}.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "lyco_worker.cli", "--queues", "gpu", "--concurrency", "1",
                              "--hostname", f"{name}@e2e", "--loglevel", "INFO"],
                             env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        self.worker = p
        return p

    def get(self, job_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base_url}/api/v1/jobs/{job_id}", headers=self.h, timeout=10)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def submit(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.base_url}/api/v1/jobs/{kind}", json=body, headers=self.h, timeout=10)
        assert r.status_code == 202, r.text
        out: dict[str, Any] = r.json()
        return out

    def wait(self, job_id: str, pred: Any, timeout: float = 90.0, what: str = "") -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.get(job_id)
            if pred(job):
                return job
            if job["state"] in ("failed",) and "failed" not in what:
                raise AssertionError(f"job failed: {job['error']}")
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or 'the job'}: {self.get(job_id)}\n{self.worker_log()}")

    def worker_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("worker-*.log")))

    def file_path(self, file_id: str) -> Path:
        from lyco_api.db import StoredFile, make_engine, session_scope
        from lyco_api.store import FileStore

        engine = make_engine(self.settings.database_url)
        try:
            with session_scope(engine) as s:
                row = s.get(StoredFile, file_id)
                assert row is not None
                return FileStore(self.settings.data_dir).path(row)
        finally:
            engine.dispose()


def _stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str, redis_url: str) -> Iterator[Stack]:
    from lyco_trainer.models import write_tiny_pipeline

    tmp = tmp_path_factory.mktemp("e2e")
    data_dir = tmp / "data"
    models = data_dir / "models"
    models.mkdir(parents=True)
    write_tiny_pipeline(models / "tiny-sd1", "sd1")
    write_dataset(models / "shapes-data", colour_tags=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYCO_")}
    env.update({
        "LYCO_DATABASE_URL": pg_url, "LYCO_BROKER_URL": redis_url, "LYCO_DATA_DIR": str(data_dir),
        "LYCO_ADMIN_KEY": ADMIN_KEY, "LYCO_JOB_SOFT_TIME_LIMIT_S": "600", "LYCO_JOB_HARD_TIME_LIMIT_S": "900",
        "LYCO_VISIBILITY_TIMEOUT_S": "1200", "OMP_NUM_THREADS": "1", "LYCO_PROGRESS": "0",
    })
    settings = Settings(_env_file=None, database_url=pg_url, broker_url=redis_url, data_dir=data_dir,  # type: ignore[call-arg]
                        admin_key=ADMIN_KEY)
    port = _free_port()
    st = Stack(f"http://127.0.0.1:{port}", settings, env, tmp)
    api_log = (tmp / "api.log").open("wb")
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "lyco_api.serve:app_factory", "--host",
                            "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                           env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
    st.procs.append(api)
    try:
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{st.base_url}/api/v1/jobs", headers=st.h, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert api.poll() is None, (tmp / "api.log").read_text()
            assert time.monotonic() < end, "the API did not start"
            time.sleep(0.2)
        st.start_worker("wA")
        yield st
    finally:
        for p in st.procs:
            _stop(p)


def _read_sse(url: str, headers: dict[str, str], timeout: float = 120.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cur: dict[str, str] = {}
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout, connect=5)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                if "id" in cur:
                    events.append({"id": int(cur["id"]), "event": cur["event"], "data": json.loads(cur["data"]),
                                   "t": time.time()})
                cur = {}
            elif not line.startswith(":") and ": " in line:
                k, v = line.split(": ", 1)
                cur[k] = v
    return events


def test_training_streams_progress_over_sse_and_yields_a_loadable_adapter(stack: Stack) -> None:
    from diffusers import UNet2DConditionModel

    import lyco_core

    job = stack.submit("train", train_body(steps=30, state_every=15))
    evs = _read_sse(f"{stack.base_url}/api/v1/jobs/{job['id']}/events", stack.h)
    states = [e["data"]["state"] for e in evs if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"], (states, stack.worker_log())
    running = next(e for e in evs if e["event"] == "state" and e["data"]["state"] == "running")
    assert running["data"]["worker"].startswith("wA@e2e#")
    steps = [e["data"]["step"] for e in evs if e["event"] == "progress"]
    assert len(steps) >= 3
    assert steps == sorted(steps)
    assert steps[-1] == 30
    assert [e["data"]["step"] for e in evs if e["event"] == "checkpoint"] == [15, 30]

    # reconnect with Last-Event-ID: the rest of the stream only
    ids = [e["id"] for e in evs]
    rest = _read_sse(f"{stack.base_url}/api/v1/jobs/{job['id']}/events", {**stack.h, "Last-Event-ID": str(ids[3])})
    assert [e["id"] for e in rest] == ids[4:]

    done = stack.get(job["id"])
    assert done["result"]["steps"] == 30
    assert done["attempts"] == 1
    first_progress = next(e["t"] for e in evs if e["event"] == "progress")
    finished = datetime.fromisoformat(done["finished_at"]).timestamp()
    assert first_progress < finished, "progress was streamed while the job ran, not replayed at the end"
    [adapter] = [f for f in done["files"] if f["kind"] == "adapter"]
    unet = UNet2DConditionModel.from_pretrained(
        str(stack.settings.models_dir / "tiny-sd1" / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base = unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
        net, report = lyco_core.load_network(stack.file_path(adapter["id"]), {"unet": unet})
        net.apply()
        tuned = unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert report.complete
    assert len(report.loaded) == 72
    assert (tuned - base).abs().max() > 1e-6
    stack.__dict__["adapter_id"] = adapter["id"]

    logs = httpx.get(f"{stack.base_url}/api/v1/jobs/{job['id']}/logs", headers=stack.h, timeout=10).text
    assert "attempt 1/3" in logs
    assert "training 30 steps" in logs


def test_cancel_queued_and_running(stack: Stack) -> None:
    long = stack.submit("train", train_body(steps=400, state_every=1000))
    queued = stack.submit("train", train_body(steps=4, state_every=2))
    r = httpx.post(f"{stack.base_url}/api/v1/jobs/{queued['id']}/cancel", headers=stack.h, timeout=10)
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"

    stack.wait(long["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 2, what="two training steps")
    r = httpx.post(f"{stack.base_url}/api/v1/jobs/{long['id']}/cancel", headers=stack.h, timeout=10)
    assert r.status_code == 200
    assert r.json()["cancel_requested"]
    ended = stack.wait(long["id"], lambda j: j["state"] == "cancelled", what="the running job to stop")
    assert ended["result"]["cancelled"]
    assert ended["result"]["state"].startswith("state-")
    stopped_at = ended["result"]["steps"]
    assert 2 <= stopped_at < 400
    state_dir = stack.settings.data_dir / "jobs" / long["id"] / "output" / ended["result"]["state"]
    assert (state_dir / "COMPLETE").is_file(), "the cancelled training kept a resumable state"
    assert not ended["files"], "a cancelled training registers no adapter"

    # the worker is free again and took the cancelled job's message: it must not have started it
    time.sleep(2.0)
    q = stack.get(queued["id"])
    assert q["state"] == "cancelled"
    assert q["attempts"] == 0
    assert q["started_at"] is None
    assert httpx.post(f"{stack.base_url}/api/v1/jobs/{long['id']}/cancel", headers=stack.h,
                      timeout=10).status_code == 409


def test_kill_9_mid_training_then_a_new_worker_resumes_from_the_saved_state(stack: Stack) -> None:
    total, every = 16, 3
    job = stack.submit("train", train_body(steps=total, state_every=every))
    stack.wait(job["id"], lambda j: (j["progress"] or {}).get("step", 0) >= 7, what="seven steps")
    old = stack.worker
    assert old is not None
    os.killpg(old.pid, signal.SIGKILL)
    old.wait(timeout=30)
    killed_at = stack.get(job["id"])
    assert killed_at["state"] == "running", "nobody has noticed the dead worker yet"
    saved = sorted(p.name for p in (stack.settings.data_dir / "jobs" / job["id"] / "output").glob("state-*"))
    assert saved, "states were written before the kill"

    stack.start_worker("wB")  # reconciles on start: wA does not answer a ping, the job is queued again
    done = stack.wait(job["id"], lambda j: j["state"] == "succeeded", timeout=120, what="the resumed job")
    res = done["result"]
    assert done["attempts"] == 2
    assert done["worker"].startswith("wB@e2e#")
    assert res["steps"] == total
    assert res["resumed_from"] is not None, res
    assert res["resumed_from_step"] >= 6, res
    assert res["resumed_from_step"] % every == 0
    assert res["steps_run"] == total - res["resumed_from_step"] < total, "fewer steps re-done than a fresh run"

    evs = _read_sse(f"{stack.base_url}/api/v1/jobs/{job['id']}/events", stack.h)
    redelivered = [e for e in evs if e["event"] == "redelivered"]
    assert redelivered
    assert redelivered[0]["data"]["previous_worker"].startswith("wA@e2e#")
    runs = [e["data"] for e in evs if e["event"] == "state" and e["data"]["state"] == "running"]
    assert [r["attempt"] for r in runs] == [1, 2]
    logs = httpx.get(f"{stack.base_url}/api/v1/jobs/{job['id']}/logs", headers=stack.h, timeout=10).text
    assert f"resuming from state-{res['resumed_from_step']:08d}" in logs


def test_generation_and_evaluation_jobs(stack: Stack) -> None:
    adapter_id = stack.__dict__.get("adapter_id")
    if adapter_id is None:
        pytest.skip("needs the adapter of the training test")
    gen = stack.submit("generate", {"base": "tiny-sd1", "adapters": [{"file": adapter_id, "strength": 1.0}],
                                    "prompts": ["circle, shape"], "seeds": [1, 2], "steps": 2, "width": 32,
                                    "height": 32, "device": "cpu"})
    ev = stack.submit("evaluate", {
        "model": {"base": "tiny-sd1"},
        "checkpoints": [{"path": adapter_id, "name": "trained"}],
        "data": {"root": "shapes-data", "resolution": 32, "buckets": False},
        "prompts": {"n_images": 1, "types": ["train", "trigger"]},
        "generation": {"steps": 2, "width": 32, "height": 32, "batch_size": 4, "device": "cpu"},
        "encoders": {"tiny": True, "device": "cpu"},
        "metrics": {"enabled": ["image_similarity", "text_similarity"]},
        "report": {"grid_images": 1},
    })
    g = stack.wait(gen["id"], lambda j: j["state"] == "succeeded", timeout=120, what="generation")
    images = [f for f in g["files"] if f["kind"] == "image"]
    assert len(images) == 2
    pixels = []
    for f in images:
        im = Image.open(io.BytesIO(stack.file_path(f["id"]).read_bytes()))
        assert im.size == (32, 32)
        pixels.append(im.tobytes())
    assert pixels[0] != pixels[1], "two seeds, two images"

    e = stack.wait(ev["id"], lambda j: j["state"] == "succeeded", timeout=150, what="evaluation")
    roles = {f["role"]: f for f in e["files"]}
    assert "html" in roles
    assert roles["html"]["kind"] == "report"
    html = stack.file_path(roles["html"]["id"]).read_text()
    assert "trained" in html
    assert "trained" in json.dumps(e["result"]["scores"])
