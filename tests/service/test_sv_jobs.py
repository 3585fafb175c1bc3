"""Jobs API and the worker's job logic in this process (PostgreSQL + Redis DB 5, no worker subprocess).

Submission validates with the engines' configs (422 naming the key) and resolves references; the broker gets only
the job id; list/get/cancel/retry/logs/SSE; the worker's ``execute`` on a tiny training (adapter registered and
loadable, events throttled, log file), a cancelled job never starts, duplicate deliveries, the attempt cap and
reconcile of a dead worker's job; an adapter operation through ``run_op`` equals the core function's output.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from shapes_dataset import write_dataset
from sqlalchemy import select

from lyco_api.db import Job, JobEvent, StoredFile, session_scope
from lyco_api.jobs import create_job, transition


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models(service: Any) -> Path:
    """The tiny SD1 pipeline and a dataset in the server's models folder."""
    from lyco_trainer.models import write_tiny_pipeline

    root = Path(service.settings.models_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_pipeline(root / "tiny-sd1", "sd1")
    write_dataset(root / "shapes-data", colour_tags=False)
    return root


def train_body(steps: int = 4, **output: Any) -> dict[str, Any]:
    return {
        "model": {"base": "tiny-sd1"},
        "network": {"algo": "lora", "preset": "attn-mlp", "dim": 4, "alpha": 2.0},
        "data": {"root": "shapes-data", "resolution": 32, "buckets": False},
        "train": {"batch_size": 2, "epochs": 50, "max_steps": steps, "unet_lr": 1e-3, "seed": 3},
        "output": {"name": "tiny", "dtype": "fp32", "tensorboard": False, "save_every_epochs": None, **output},
        "sample": {"prompts": []},
    }


def broker_ids(redis_url: str, queue: str) -> list[list[Any]]:
    """The task arguments of every message waiting in ``queue`` (kombu's JSON envelope, body base64)."""
    r = redis.Redis.from_url(redis_url)
    out = []
    for raw in r.lrange(queue, 0, -1):
        env = json.loads(raw)
        body = json.loads(base64.b64decode(env["body"]))
        out.append(body[0])
    return out


# --------------------------------------------------------------------------------------------- submission
def test_invalid_configs_are_422_naming_the_key(service: Any, models: Path) -> None:
    c, h = service.client, service.user
    bad = train_body()
    bad["train"]["epocs"] = 3
    r = c.post("/api/v1/jobs/train", json=bad, headers=h)
    assert r.status_code == 422, r.text
    assert "train.epocs" in r.json()["detail"], r.text

    bad = train_body()
    bad["train"]["batch_size"] = 0
    r = c.post("/api/v1/jobs/train", json=bad, headers=h)
    assert r.status_code == 422, r.text
    assert "train.batch_size" in r.json()["detail"], r.text

    bad = train_body()
    bad["model"]["base"] = "/etc"
    r = c.post("/api/v1/jobs/train", json=bad, headers=h)
    assert r.status_code == 422, r.text
    assert "model.base" in r.json()["detail"], r.text

    bad = train_body()
    bad["model"]["base"] = "../../../../etc"
    r = c.post("/api/v1/jobs/train", json=bad, headers=h)
    assert r.status_code == 422, r.text
    assert "model.base" in r.json()["detail"], r.text

    bad = train_body()
    bad["data"]["root"] = "no-such-dataset"
    r = c.post("/api/v1/jobs/train", json=bad, headers=h)
    assert r.status_code == 422, r.text
    assert "data.root" in r.json()["detail"], r.text

    r = c.post("/api/v1/jobs/generate", json={"base": "tiny-sd1", "prompts": ["x"], "width": 30}, headers=h)
    assert r.status_code == 422
    assert "width" in r.text

    r = c.post("/api/v1/jobs/evaluate", json={"model": {"base": "tiny-sd1"}, "data": {"root": "shapes-data"},
                                              "checkpoints": [{"path": "tiny-sd1"}], "metrics": {"enabled": ["vendi"]}},
               headers=h)
    assert r.status_code == 422, r.text
    assert "encoders.dinov2" in r.json()["detail"], r.text
    with session_scope(service.app.state.engine) as s:
        assert s.scalar(select(Job).where(Job.kind == "evaluate")) is None, "nothing invalid was queued"


def test_another_users_file_is_not_a_reference(service: Any, models: Path) -> None:
    with session_scope(service.app.state.engine) as s:
        from lyco_api.auth import principal_for_key

        owner = principal_for_key(s, service.other_key)
        assert owner is not None
        f = service.app.state.store.add(s, owner.user_id, "adapter", b"not really", "bob.safetensors")
        fid = f.id
    body = {"base": "tiny-sd1", "prompts": ["x"], "adapters": [{"file": fid}]}
    r = service.client.post("/api/v1/jobs/generate", json=body, headers=service.user)
    assert r.status_code == 422
    assert "adapters.0.file" in r.json()["detail"]
    assert "no file" in r.json()["detail"]
    r = service.client.post("/api/v1/jobs/generate", json={**body, "adapters": []}, headers=service.other)
    assert r.status_code == 202


def test_submit_queues_only_the_job_id_then_list_get_and_isolation(service: Any, models: Path,
                                                                   redis_url: str) -> None:
    c = service.client
    r = c.post("/api/v1/jobs/train", json=train_body(), headers=service.user)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued"
    assert job["queue"] == "gpu"
    assert job["attempts"] == 0
    cfg = job["params"]["config"]
    assert cfg["model"]["base"] == str((models / "tiny-sd1").resolve())
    assert "dir" not in cfg["output"]
    assert cfg["output"]["state_every_steps"] == 50
    assert [job["id"]] in broker_ids(redis_url, "gpu"), "the message carries the job id and nothing else"

    assert c.get(f"/api/v1/jobs/{job['id']}", headers=service.user).json()["id"] == job["id"]
    assert c.get(f"/api/v1/jobs/{job['id']}", headers=service.other).status_code == 404
    assert c.get(f"/api/v1/jobs/{job['id']}", headers=service.admin).status_code == 200
    assert c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.other).status_code == 404

    mine = c.get("/api/v1/jobs?kind=train&state=queued", headers=service.user).json()
    assert job["id"] in [j["id"] for j in mine["items"]]
    assert mine["count"] >= 1
    assert all(j["kind"] == "train" and j["state"] == "queued" for j in mine["items"])
    theirs = c.get("/api/v1/jobs", headers=service.other).json()
    assert job["id"] not in [j["id"] for j in theirs["items"]]
    page = c.get("/api/v1/jobs?limit=1&offset=0", headers=service.admin).json()
    assert len(page["items"]) == 1
    assert page["count"] >= 2
    assert c.get("/api/v1/jobs?state=bogus", headers=service.user).status_code == 422
    assert c.get("/api/v1/jobs", headers={}).status_code == 401


def test_cancel_queued_never_starts_and_retry_requeues(service: Any, models: Path, redis_url: str) -> None:
    from lyco_worker.tasks import execute

    c = service.client
    job = c.post("/api/v1/jobs/train", json=train_body(), headers=service.user).json()
    r = c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.user)
    assert r.status_code == 200
    assert r.json()["state"] == "cancelled"
    # the message is still in the broker; the worker takes it and does nothing
    ended = execute(job["id"], service.settings)
    assert ended is not None
    assert ended.state == "cancelled"
    assert ended.attempts == 0
    assert ended.started_at is None
    assert c.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.user).status_code == 409

    before = len(broker_ids(redis_url, "gpu"))
    r = c.post(f"/api/v1/jobs/{job['id']}/retry", headers=service.user)
    assert r.status_code == 202
    assert r.json()["state"] == "queued"
    assert r.json()["attempts"] == 0
    assert len(broker_ids(redis_url, "gpu")) == before + 1
    assert c.post(f"/api/v1/jobs/{job['id']}/retry", headers=service.user).status_code == 409


# --------------------------------------------------------------------------------------------- execution
def _sse_events(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "id" in fields:
            out.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return out


def test_training_job_runs_registers_a_loadable_adapter_and_streams_events(service: Any, models: Path) -> None:
    from diffusers import UNet2DConditionModel

    import lyco_core
    from lyco_worker.tasks import execute

    c = service.client
    job = c.post("/api/v1/jobs/train", json=train_body(steps=6, state_every_steps=3), headers=service.user).json()
    ended = execute(job["id"], service.settings)
    assert ended is not None
    assert ended.state == "succeeded", ended.error
    got = c.get(f"/api/v1/jobs/{job['id']}", headers=service.user).json()
    assert got["attempts"] == 1
    assert got["worker"]
    assert got["duration_s"] > 0
    assert got["result"]["steps"] == 6
    assert got["result"]["resumed_from"] is None
    assert got["result"]["steps_run"] == 6
    assert got["progress"]["kind"] == "end"
    assert got["progress"]["step"] == 6
    [adapter] = [f for f in got["files"] if f["kind"] == "adapter"]
    assert got["result"]["file_id"] == adapter["id"]

    with session_scope(service.app.state.engine) as s:
        row = s.get(StoredFile, adapter["id"])
        assert row is not None
        assert row.user_id != 0
        assert row.meta["job_id"] == job["id"]
        path = service.app.state.store.path(row)
        assert service.app.state.store.verify(row)
    unet = UNet2DConditionModel.from_pretrained(str(models / "tiny-sd1" / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        base = unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
        net, report = lyco_core.load_network(path, {"unet": unet})
        net.apply()
        tuned = unet(x, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert len(report.loaded) == 72, "every trained module loads into the tiny UNet"
    assert report.complete, "every trained module loads into the tiny UNet"
    assert (tuned - base).abs().max() > 1e-6, "the trained adapter changes the UNet's output"

    # events: state changes, throttled progress (≤ steps), the final state last; SSE replays them and ends
    r = c.get(f"/api/v1/jobs/{job['id']}/events", headers=service.user)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = _sse_events(r.text)
    kinds = [e["event"] for e in evs]
    states = [e["data"]["state"] for e in evs if e["event"] == "state"]
    assert states == ["queued", "running", "succeeded"], states
    assert evs[-1]["event"] == "state"
    assert evs[-1]["data"]["state"] == "succeeded"
    progress = [e["data"]["step"] for e in evs if e["event"] == "progress"]
    assert progress
    assert progress == sorted(progress)
    assert progress[-1] == 6
    assert len(progress) <= 6
    assert "start" in kinds
    assert "end" in kinds
    assert "state" in kinds
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids)
    # reconnect after the third event: exactly the rest
    r2 = c.get(f"/api/v1/jobs/{job['id']}/events", headers={**service.user, "Last-Event-ID": str(ids[2])})
    assert [e["id"] for e in _sse_events(r2.text)] == ids[3:]
    assert c.get(f"/api/v1/jobs/{job['id']}/events", headers=service.other).status_code == 404

    log = c.get(f"/api/v1/jobs/{job['id']}/logs", headers=service.user)
    assert log.status_code == 200
    assert "attempt 1/3" in log.text
    assert "training 6 steps" in log.text
    assert c.get(f"/api/v1/jobs/{job['id']}/logs?tail=1", headers=service.user).text.count("\n") == 1

    # a second delivery of the finished job's message does nothing
    again = execute(job["id"], service.settings)
    assert again is not None
    assert again.state == "succeeded"
    assert again.attempts == 1


def _queued(service: Any, params: dict[str, Any], kind: str = "train", max_attempts: int = 3) -> str:
    from lyco_api.auth import principal_for_key

    with session_scope(service.app.state.engine) as s:
        who = principal_for_key(s, service.user_key)
        assert who is not None
        return create_job(s, who.user_id, kind, params, max_attempts=max_attempts).id


def _force_running(service: Any, job_id: str, holder: str, attempts: int) -> None:
    from sqlalchemy import update

    with session_scope(service.app.state.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        transition(s, job, "running", worker=holder)
        s.execute(update(Job).where(Job.id == job_id).values(attempts=attempts))


def test_duplicate_delivery_of_a_job_a_live_worker_runs_is_refused(service: Any, models: Path) -> None:
    from lyco_worker.tasks import JobBusyError, execute, holder_alive, node_name

    job_id = _queued(service, {"config": train_body()})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = f"{node_name()}#{sleeper.pid}"
        assert holder_alive(holder, node_name())
        _force_running(service, job_id, holder, 1)
        with pytest.raises(JobBusyError):
            execute(job_id, service.settings)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not holder_alive(holder, node_name())
    with session_scope(service.app.state.engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.state == "running"
        assert job.attempts == 1
        assert job.worker == holder


def test_attempt_cap_and_reconcile_of_dead_workers(service: Any, models: Path, redis_url: str) -> None:
    from lyco_worker.reconcile import reconcile
    from lyco_worker.tasks import execute

    # at the cap: a redelivery of a job whose worker died on its last attempt fails it
    capped = _queued(service, {"config": train_body()}, max_attempts=2)
    _force_running(service, capped, "gone-node@nowhere#4242", 2)
    ended = execute(capped, service.settings)
    assert ended is not None
    assert ended.state == "failed"
    assert "gave up after 2 attempt" in (ended.error or "")

    # reconcile: a dead worker's job is queued again (and enqueued), one at the cap fails, a live one stays
    dead = _queued(service, {"config": train_body()})
    _force_running(service, dead, "gone-node@nowhere#4242", 1)
    dead_capped = _queued(service, {"config": train_body()}, max_attempts=1)
    _force_running(service, dead_capped, "gone-node@nowhere#4243", 1)
    live = _queued(service, {"config": train_body()})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _force_running(service, live, f"me@here#{sleeper.pid}", 1)  # a live process on this machine
        t0 = time.monotonic()
        res = reconcile(service.settings, my_node="me@here")
        assert time.monotonic() - t0 < 10
    finally:
        sleeper.kill()
        sleeper.wait()
    assert dead in res["requeued"]
    assert dead_capped in res["failed"]
    assert live in res["alive"]
    assert [dead] in broker_ids(redis_url, "gpu")
    with session_scope(service.app.state.engine) as s:
        row = s.get(Job, dead)
        assert row is not None
        assert row.state == "queued"
        assert row.worker is None
        kinds = list(s.scalars(select(JobEvent.kind).where(JobEvent.job_id == dead)))
        assert "redelivered" in kinds
        live_row = s.get(Job, live)
        assert live_row is not None
        assert live_row.state == "running"
        transition(s, live_row, "failed", error="test cleanup")


def test_op_job_rescale_equals_the_core_function(service: Any, tmp_path: Path) -> None:
    from adapter_files import make_adapter

    from lyco_api.auth import principal_for_key
    from lyco_core.formats.safetensors_io import load_tensors
    from lyco_core.ops.rescale import rescale_adapter
    from lyco_worker.runners.ops import run_op

    src = make_adapter(tmp_path / "in.safetensors", "lora", seed=1)
    with session_scope(service.app.state.engine) as s:
        who = principal_for_key(s, service.user_key)
        assert who is not None
        f = service.app.state.store.add(s, who.user_id, "adapter", Path(src), "in.safetensors")
        job = create_job(s, who.user_id, "op", {"op": "rescale", "inputs": {"adapter": f.id},
                                                 "options": {"multiplier": 0.5}, "output_name": "half.safetensors"})
        job_id, user_id = job.id, who.user_id
    ended = run_op(job_id, service.settings)
    assert ended is not None
    assert ended.state == "succeeded", ended.error
    assert ended.queue == "cpu"
    assert ended.result is not None
    assert ended.result["report"]["operation"]
    with session_scope(service.app.state.engine) as s:
        out = s.get(StoredFile, ended.result["file_id"])
        assert out is not None
        assert out.user_id == user_id
        assert out.kind == "adapter"
        assert out.name == "half.safetensors"
        got = load_tensors(service.app.state.store.path(out))
    rescale_adapter(src, tmp_path / "direct.safetensors", multiplier=0.5)
    want = load_tensors(tmp_path / "direct.safetensors")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    bad = _queued(service, {"op": "rescale", "inputs": {"adapter": f.id}, "options": {"bogus": 1}}, kind="op")
    ended = run_op(bad, service.settings)
    assert ended is not None
    assert ended.state == "failed"
    assert "options.bogus" in (ended.error or "")
