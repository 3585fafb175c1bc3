"""Adapter operations through the API, end to end: uvicorn-free in-process API (PostgreSQL), a real Celery worker
subprocess on the ``cpu`` queue (Redis DB 4), each operation's output checked against the weight changes computed
here (merge, rescale) or against the same ``lyco_core`` call made locally (resize, convert, bake, extract)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_files import base_weights, make_adapter, models
from checkpoints import ldm_state_dict, save_ldm, save_pipeline
from conftest import ADMIN_KEY, Service, build_settings
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from lyco_api.app import create_app
from lyco_api.db import OpResult, Session
from lyco_core.files import read_adapter
from lyco_core.ops.inspect import inspect_adapter

KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_down_blocks_0_resnets_0_conv1"]


@pytest.fixture(scope="module")
def worker(service: Service, pg_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real ``celery -A lyco_worker.app worker`` on the cpu queue, sharing the API's database, broker and store."""
    cwd = tmp_path_factory.mktemp("worker-cwd")  # no .env there
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYCO_")}
    env.update(LYCO_DATABASE_URL=pg_url, LYCO_BROKER_URL=redis_url, LYCO_DATA_DIR=str(service.settings.data_dir),
               LYCO_MODELS_DIR=str(service.settings.models_dir), LYCO_PROGRESS="0")
    log = (cwd / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "lyco_worker.app", "worker", "--queues", "cpu", "--concurrency", "1",
         "--hostname", f"ops-test-{os.getpid()}@%h", "--loglevel", "WARNING", "--without-mingle", "--without-gossip",
         "--max-tasks-per-child", "1000"],  # one warm child: these jobs are small (fresh children: test_sv_jobs)
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def assets(service: Service, worker: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters and three models (SD1 pipeline folder, a tuned copy, an LDM single file), uploaded/registered."""
    tmp = tmp_path_factory.mktemp("assets")
    c, h = service.client, service.user
    out: dict[str, Any] = {"paths": {}}
    for name, seed in (("a", 1), ("b", 2)):
        p = make_adapter(tmp / f"{name}.safetensors", "lora", seed=seed)
        r = c.post("/api/v1/files/adapters", headers=h, files={"file": (p.name, p.read_bytes())})
        assert r.status_code == 201, r.text
        out[name], out["paths"][name] = r.json()["id"], p
    m = models()
    mdir = service.settings.models_dir
    save_pipeline(mdir / "base", m["unet"], m["te"])
    save_ldm(mdir / "base-ldm.safetensors", ldm_state_dict(m["unet"], m["te"], te_layout="sd1"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in list(m["unet"].parameters()) + list(m["te"].parameters()):
            if p.ndim >= 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_pipeline(mdir / "tuned", m["unet"], m["te"])
    for name, path in (("base", "base"), ("ldm", "base-ldm.safetensors"), ("tuned", "tuned")):
        r = c.post("/api/v1/models", headers=h, json={"path": path})
        assert r.status_code == 201, r.text
        out[name] = r.json()["id"]
        out["paths"][name] = mdir / path
    return out


def op(service: Service, name: str, body: dict[str, Any], key: dict[str, str] | None = None) -> Any:
    return service.client.post(f"/api/v1/ops/{name}", headers=key or service.user, json=body)


def ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["state"] == "succeeded"
    assert body["job_id"]
    return body


def download(service: Service, fid: str) -> bytes:
    r = service.client.get(f"/api/v1/files/{fid}/download", headers=service.user)
    assert r.status_code == 200
    return r.content


def saved(tmp_path: Path, data: bytes, name: str = "out.safetensors") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def same_changes(a: Path, b: Path) -> None:
    """Both LoRA files make the same weight changes (SVD factors may differ in sign and last bits across processes
    with other thread counts)."""
    fa, fb = read_adapter(a), read_adapter(b)
    assert fa.modules.keys() == fb.modules.keys()
    for k, m in fa.modules.items():
        up, down = m.tensors["lora_up.weight"].flatten(1), m.tensors["lora_down.weight"].flatten(1)
        up2, down2 = fb.modules[k].tensors["lora_up.weight"].flatten(1), fb.modules[k].tensors["lora_down.weight"]
        assert rel(up @ down, up2 @ down2.flatten(1)) < 1e-4, k


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# --------------------------------------------------------------------------------------------- read-only
def test_inspect(service: Service, assets: dict[str, Any]) -> None:
    body = ok(op(service, "inspect", {"file_id": assets["a"]}))
    rep = body["report"]
    assert rep["module_count"] == len(read_adapter(assets["paths"]["a"]).modules) == 291
    assert rep["algorithms"] == {"lora": 291}
    assert "modules" not in rep
    assert body["file"] is None
    assert str(service.settings.data_dir) not in str(rep)
    full = ok(op(service, "inspect", {"file_id": assets["a"], "modules": True}))["report"]
    assert len(full["modules"]) == 291
    assert full["modules"][KEYS[0]]["rank"] == 4


def _job(service: Service, job_id: str) -> Any:
    r = service.client.get(f"/api/v1/jobs/{job_id}", headers=service.user)
    assert r.status_code == 200
    return r.json()


def _as_answered(report: dict[str, Any]) -> dict[str, Any]:
    """A local ``inspect_adapter`` report as the API answers it (JSON, no server path)."""
    return {k: v for k, v in json.loads(json.dumps(report)).items() if k != "file"}


def test_inspect_is_answered_from_the_upload_and_equals_a_worker_run(service: Service, assets: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    """The upload kept its inspect report, so an inspect needs no worker; a file a job wrote has no kept report, so
    its first inspect runs on the worker and the next is answered from what that run kept. Every answer equals
    ``inspect_adapter`` run here on the same bytes."""
    cached = ok(op(service, "inspect", {"file_id": assets["b"], "modules": True}))
    job = _job(service, cached["job_id"])
    assert job["result"]["cached"] is True
    assert job["worker"] is None  # never reached a worker
    assert job["attempts"] == 0
    assert [e["state"] for e in _events(service, cached["job_id"])] == ["queued", "succeeded"]
    assert cached["report"] == _as_answered(inspect_adapter(assets["paths"]["b"]))

    out = ok(op(service, "rescale", {"file_id": assets["b"], "multiplier": 0.5}))["file"]
    ran = ok(op(service, "inspect", {"file_id": out["id"], "modules": True}))
    job = _job(service, ran["job_id"])
    assert "cached" not in job["result"]
    assert job["worker"]
    assert job["attempts"] == 1
    assert ran["report"] == _as_answered(inspect_adapter(saved(tmp_path, download(service, out["id"]))))
    with Session(bind=service.app.state.engine) as s:
        kept = s.get(OpResult, job["params"]["cache_key"])
        assert kept is not None
        assert "file" not in kept.report  # no server path kept
    again = ok(op(service, "inspect", {"file_id": out["id"]}))
    assert _job(service, again["job_id"])["result"]["cached"] is True
    assert again["report"] == {k: v for k, v in ran["report"].items() if k != "modules"}
    # another user's copy of the same bytes is answered from the same report, under that user's own job
    other = service.client.post("/api/v1/files/adapters", headers=service.other,
                                files={"file": ("copy.safetensors", assets["paths"]["b"].read_bytes())})
    assert other.status_code == 201
    mine = ok(op(service, "inspect", {"file_id": other.json()["id"]}, service.other))
    assert mine["report"] == {k: v for k, v in cached["report"].items() if k != "modules"}
    assert service.client.get(f"/api/v1/jobs/{mine['job_id']}", headers=service.user).status_code == 404


def _events(service: Service, job_id: str) -> list[dict[str, Any]]:
    r = service.client.get(f"/api/v1/jobs/{job_id}/events", headers=service.user)
    assert r.status_code == 200
    out = []
    for block in r.text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if fields.get("event") == "state":
            out.append(json.loads(fields["data"]))
    return out


def test_check(service: Service, assets: dict[str, Any]) -> None:
    rep = ok(op(service, "check", {"file_id": assets["a"], "base_model_id": assets["base"]}))["report"]
    assert rep["fits"] is True
    assert len(rep["loaded"]) == 291
    assert rep["base_family"] == "sd1"
    assert rep["file"] == assets["a"]
    assert rep["base"] == assets["base"]


# --------------------------------------------------------------------------------------------- writing ops
def test_merge_equals_weighted_sum(service: Service, assets: dict[str, Any], tmp_path: Path) -> None:
    body = ok(op(service, "merge", {"file_ids": [assets["a"], assets["b"]], "weights": [1.0, 0.5],
                                    "name": "ab.safetensors"}))
    f = body["file"]
    assert f["kind"] == "adapter"
    assert f["name"] == "ab.safetensors"
    assert body["report"]["output"] == "ab.safetensors"
    out = read_adapter(saved(tmp_path, download(service, f["id"])))
    a, b = read_adapter(assets["paths"]["a"]), read_adapter(assets["paths"]["b"])
    weights = base_weights()
    for k in KEYS:
        w = weights[k][0]
        want = a.modules[k].delta_weight(w) + 0.5 * b.modules[k].delta_weight(w)
        assert rel(out.modules[k].delta_weight(w), want) < 1e-5


def test_rescale_multiplier(service: Service, assets: dict[str, Any], tmp_path: Path) -> None:
    body = ok(op(service, "rescale", {"file_id": assets["a"], "multiplier": 0.5}))
    assert body["file"]["name"] == "a-rescale.safetensors"
    out = read_adapter(saved(tmp_path, download(service, body["file"]["id"])))
    a = read_adapter(assets["paths"]["a"])
    weights = base_weights()
    for k in KEYS:
        w = weights[k][0]
        assert rel(out.modules[k].delta_weight(w), 0.5 * a.modules[k].delta_weight(w)) < 1e-5


def test_resize_matches_library(service: Service, assets: dict[str, Any], tmp_path: Path) -> None:
    from lyco_core.ops.resize import resize_adapter

    body = ok(op(service, "resize", {"file_id": assets["a"], "rank": 2, "method": "full"}))
    got = saved(tmp_path, download(service, body["file"]["id"]))
    assert {m.describe()["rank"] for m in read_adapter(got).modules.values()} == {2}
    local = resize_adapter(assets["paths"]["a"], tmp_path / "local.safetensors", rank=2, method="full")
    same_changes(got, tmp_path / "local.safetensors")
    assert body["report"]["modules"][KEYS[0]]["rel_error"] == pytest.approx(local.modules[KEYS[0]].rel_error)


def test_convert_to_peft_folder(service: Service, assets: dict[str, Any]) -> None:
    body = ok(op(service, "convert", {"file_id": assets["a"], "to": "peft"}))
    f = body["file"]
    assert f["kind"] == "adapter"
    assert f["name"].endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(download(service, f["id"]))) as zf:
        names = set(zf.namelist())
    assert any(n.endswith("adapter_config.json") for n in names), names
    assert any(n.endswith(".safetensors") for n in names), names


def test_bake_matches_library(service: Service, assets: dict[str, Any], tmp_path: Path) -> None:
    from lyco_core.ops.bake import bake

    body = ok(op(service, "bake", {"base_model_id": assets["ldm"], "file_ids": [assets["a"]], "multipliers": [0.7]}))
    assert body["file"]["kind"] == "model"
    got = saved(tmp_path, download(service, body["file"]["id"]))
    bake(assets["paths"]["ldm"], [assets["paths"]["a"]], tmp_path / "local.safetensors", multipliers=[0.7])
    same_tensors(got, tmp_path / "local.safetensors")
    base = load_file(str(assets["paths"]["ldm"]))
    baked = load_file(str(got))
    assert sum(not torch.equal(base[k], baked[k]) for k in base) >= 200  # the adapter's layers changed


def test_extract_matches_library(service: Service, assets: dict[str, Any], tmp_path: Path) -> None:
    from lyco_core.ops.extract import extract_adapter

    body = ok(op(service, "extract", {"base_model_id": assets["base"], "tuned_model_id": assets["tuned"], "rank": 4,
                                      "svd": "full"}))
    got = saved(tmp_path, download(service, body["file"]["id"]))
    assert len(read_adapter(got).modules) == len(body["report"]["modules"]) > 0
    extract_adapter(assets["paths"]["base"], assets["paths"]["tuned"], tmp_path / "local.safetensors", rank=4,
                    method="full", dtype=torch.float32)
    same_changes(got, tmp_path / "local.safetensors")


# --------------------------------------------------------------------------------------------- refusals
def test_refusals(service: Service, assets: dict[str, Any]) -> None:
    r = op(service, "rescale", {"file_id": assets["a"], "multiplier": 0.5, "alpha": 2.0})
    assert r.status_code == 400
    assert "exactly one" in r.json()["detail"]
    assert r.json()["job_id"]
    assert op(service, "rescale", {"file_id": assets["a"], "nope": 1}).status_code == 422
    assert op(service, "merge", {"file_ids": []}).status_code == 422
    assert op(service, "convert", {"file_id": assets["a"], "to": "onnx"}).status_code == 422
    assert op(service, "resize", {"file_id": assets["a"], "rank": 2, "name": "../x"}).status_code == 422
    # another user's file, or an unknown id: 404 before any job exists; a file of the wrong kind: 422
    assert op(service, "inspect", {"file_id": assets["a"]}, service.other).status_code == 404
    assert op(service, "inspect", {"file_id": "no-such-file"}).status_code == 404
    r = op(service, "check", {"file_id": assets["a"], "base_model_id": assets["a"]})
    assert r.status_code == 422
    assert "expected a model" in r.json()["detail"]
    assert service.client.post("/api/v1/ops/inspect", json={"file_id": assets["a"]}).status_code == 401


def test_slow_answer_is_202_then_poll(service: Service, assets: dict[str, Any],
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = build_settings(service.settings.data_dir, database_url=service.settings.database_url,
                              broker_url=service.settings.broker_url, admin_key=ADMIN_KEY,
                              models_dir=service.settings.models_dir, op_wait_s=0.001)
    with TestClient(create_app(settings)) as c:
        r = c.post("/api/v1/ops/check", headers=service.user,
                   json={"file_id": assets["a"], "base_model_id": assets["base"]})
        assert r.status_code == 202
        assert r.json()["state"] in ("queued", "running")
        assert r.json()["report"] is None
        url = r.headers["location"]
        assert url == f"/api/v1/ops/jobs/{r.json()['job_id']}"
        deadline = time.monotonic() + 60
        while (got := c.get(url, headers=service.user).json())["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert got["state"] == "succeeded"
        assert len(got["report"]["loaded"]) == 291
        assert c.get(url, headers=service.other).status_code == 404
