"""Files, datasets and models through the API (real PostgreSQL): adapter uploads validated and size-limited,
list/download (ETag)/delete, the 404 matrix across users, safe dataset zips, base-model registration."""

from __future__ import annotations

import hashlib
import io
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from adapter_files import make_adapter, models
from checkpoints import save_pipeline
from conftest import ADMIN_KEY, Service, build_settings
from fastapi.testclient import TestClient
from PIL import Image

from lyco_api.app import create_app
from lyco_api.auth import create_key
from lyco_api.db import session_scope
from lyco_core.files import read_adapter


def png(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 1 if mode == "1" else (120, 30, 200)).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


@pytest.fixture(scope="module")
def adapter_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    p = make_adapter(tmp_path_factory.mktemp("adapters") / "my lora.safetensors", "lora")
    return p, p.read_bytes()


@pytest.fixture(scope="module")
def small(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A second app on the same database with tight limits: 1 MiB uploads, 5 zip entries, 1 MiB unzipped,
    10 000 pixels per image."""
    settings = build_settings(tmp_path_factory.mktemp("small-data"), database_url=service.settings.database_url,
                              broker_url=service.settings.broker_url, admin_key=ADMIN_KEY, max_upload_mb=1,
                              max_zip_entries=5, max_zip_total_mb=1, max_image_pixels=10_000)
    with TestClient(create_app(settings)) as c:
        yield c


def upload(client: TestClient, key: dict[str, str], data: bytes, name: str = "a.safetensors",
           url: str = "/api/v1/files/adapters") -> Any:
    return client.post(url, headers=key, files={"file": (name, data, "application/octet-stream")})


def count(client: TestClient, key: dict[str, str], kind: str) -> int:
    r = client.get("/api/v1/files", headers=key, params={"kind": kind})
    assert r.status_code == 200
    return int(r.json()["count"])


def tmp_leftovers(service: Service) -> list[Path]:
    return list((service.settings.data_dir / "tmp").iterdir())


# --------------------------------------------------------------------------------------------- adapters
def test_upload_valid_adapter(service: Service, adapter_bytes: tuple[Path, bytes]) -> None:
    path, data = adapter_bytes
    r = upload(service.client, service.user, data, "my lora.safetensors")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "adapter"
    assert body["name"] == "my lora.safetensors"
    assert body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    f = read_adapter(path)
    assert body["meta"]["module_count"] == len(f.modules) == 291
    assert body["meta"]["algorithms"] == {"lora": 291}
    assert body["meta"]["base_family"]["family"] == "sd1"
    assert tmp_leftovers(service) == []
    got = service.client.get(f"/api/v1/files/{body['id']}", headers=service.user).json()
    assert got == body


@pytest.mark.parametrize(("data", "reason"), [
    (b"short", "not a safetensors file"),
    (b"hello, not an adapter", "header too large"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", "header"),
])
def test_upload_invalid_adapter_is_refused_and_not_stored(service: Service, data: bytes, reason: str) -> None:
    before = count(service.client, service.user, "adapter")
    r = upload(service.client, service.user, data, "bad.safetensors")
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail.startswith("bad.safetensors: ")
    assert reason in detail
    assert "\n" not in detail
    assert str(service.settings.data_dir) not in detail  # the reason names the upload, not a server path
    assert count(service.client, service.user, "adapter") == before
    assert tmp_leftovers(service) == []


def test_upload_state_dict_without_adapter_modules(service: Service, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"model.weight": torch.zeros(4, 4)}, str(tmp_path / "w.safetensors"))
    r = upload(service.client, service.user, (tmp_path / "w.safetensors").read_bytes(), "w.safetensors")
    assert r.status_code == 400
    assert "no algorithm uses" in r.json()["detail"]


def test_upload_too_large(small: TestClient, service: Service) -> None:
    before = count(small, service.user, "adapter")
    r = upload(small, service.user, b"\0" * (1 << 20) + b"x" * 100_000)  # body over 1 MiB + overhead
    assert r.status_code == 413
    assert "limit of 1 MiB" in r.json()["detail"]
    # A part just over the limit inside a body within the overhead allowance is caught while streaming.
    r = upload(small, service.user, b"\0" * ((1 << 20) + 10))
    assert r.status_code == 413
    assert count(small, service.user, "adapter") == before
    data_dir = small.app.state.settings.data_dir  # type: ignore[attr-defined]
    assert list((data_dir / "tmp").iterdir()) == []


def test_upload_needs_multipart_and_submit_scope(service: Service) -> None:
    r = service.client.post("/api/v1/files/adapters", headers=service.user, content=b"raw")
    assert r.status_code == 415
    r = service.client.post("/api/v1/files/adapters", headers=service.user, files={"other": ("a", b"x")})
    assert r.status_code == 400
    assert upload(service.client, {}, b"x").status_code == 401
    with session_scope(service.app.state.engine) as s:
        _, reader = create_key(s, "alice", ["read"])
    assert upload(service.client, service.headers(reader), b"x").status_code == 403
    assert service.client.get("/api/v1/files", headers=service.headers(reader)).status_code == 200


def test_list_download_etag_delete(service: Service, adapter_bytes: tuple[Path, bytes]) -> None:
    _, data = adapter_bytes
    fid = upload(service.client, service.user, data).json()["id"]
    listed = service.client.get("/api/v1/files", headers=service.user, params={"kind": "adapter", "limit": 1})
    assert listed.json()["items"][0]["id"] == fid
    assert listed.json()["count"] >= 1
    datasets = service.client.get("/api/v1/files", headers=service.user, params={"kind": "dataset"}).json()
    assert fid not in [f["id"] for f in datasets["items"]]
    assert all(f["kind"] == "dataset" for f in datasets["items"])
    r = service.client.get(f"/api/v1/files/{fid}/download", headers=service.user)
    assert r.status_code == 200
    assert r.content == data
    etag = r.headers["etag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
    r = service.client.get(f"/api/v1/files/{fid}/download", headers={**service.user, "If-None-Match": etag})
    assert r.status_code == 304
    assert r.content == b""
    r = service.client.get(f"/api/v1/files/{fid}/download", headers={**service.user, "If-None-Match": '"other"'})
    assert r.status_code == 200
    assert r.content == data
    stored = service.settings.data_dir / "files" / fid[:2] / fid
    assert stored.is_dir()
    assert service.client.delete(f"/api/v1/files/{fid}", headers=service.user).status_code == 204
    assert not stored.exists()
    for method, url in (("GET", f"/api/v1/files/{fid}"), ("GET", f"/api/v1/files/{fid}/download"),
                        ("DELETE", f"/api/v1/files/{fid}")):
        assert service.client.request(method, url, headers=service.user).status_code == 404


def test_other_users_files_answer_404_admin_sees_all(service: Service, adapter_bytes: tuple[Path, bytes]) -> None:
    _, data = adapter_bytes
    fid = upload(service.client, service.user, data).json()["id"]
    for method, url in (("GET", f"/api/v1/files/{fid}"), ("GET", f"/api/v1/files/{fid}/download"),
                        ("DELETE", f"/api/v1/files/{fid}"), ("GET", "/api/v1/files/no-such-id")):
        r = service.client.request(method, url, headers=service.other)
        assert r.status_code == 404, (method, url)
    assert fid not in [f["id"] for f in service.client.get("/api/v1/files?limit=500", headers=service.other)
                       .json()["items"]]
    assert fid in [f["id"] for f in service.client.get("/api/v1/files?limit=500", headers=service.admin)
                   .json()["items"]]
    assert service.client.get(f"/api/v1/files/{fid}/download", headers=service.admin).content == data
    assert service.client.get(f"/api/v1/files/{fid}", headers=service.user).status_code == 200  # bob deleted nothing
    assert service.client.delete(f"/api/v1/files/{fid}", headers=service.admin).status_code == 204


# --------------------------------------------------------------------------------------------- datasets
def test_dataset_zip_extracted_non_images_reported(service: Service) -> None:
    images = {"dog/a.png": png(64, 48), "dog/b.png": png(32, 32), "cat/c.png": png(40, 40)}
    z = make_zip({**images, "dog/a.txt": b"a dog on grass", "dog/notes.md": b"# notes", "cat/data.bin": b"\1\2",
                  "cat/fake.png": b"not really a png", "__MACOSX/dog/._a.png": b"junk"})
    before = count(service.client, service.user, "dataset")
    r = upload(service.client, service.user, z, "pets.zip", url="/api/v1/datasets")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["images"] == 3
    assert body["side_files"] == ["dog/a.txt"]
    non = {x["name"]: x["reason"] for x in body["non_images"]}
    assert set(non) == {"dog/notes.md", "cat/data.bin", "cat/fake.png", "__MACOSX/dog/._a.png"}
    assert "not an image" in non["dog/notes.md"]
    assert "not a readable image" in non["cat/fake.png"]
    assert str(service.settings.data_dir) not in r.text
    concepts = {c["name"]: c["images"] for c in body["summary"]["concepts"]}
    assert concepts == {"dog": 2, "cat": 1}
    assert body["file"]["kind"] == "dataset"
    assert body["file"]["folder"] is True
    assert body["file"]["name"] == "pets"
    assert count(service.client, service.user, "dataset") == before + 1
    # Download: a zip of exactly the kept files, byte for byte.
    fid = body["file"]["id"]
    r = service.client.get(f"/api/v1/files/{fid}/download", headers=service.user)
    assert r.status_code == 200
    assert r.headers["etag"] == f'"{body["file"]["sha256"]}"'
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        got = {n: zf.read(n) for n in zf.namelist()}
    assert got == {**images, "dog/a.txt": b"a dog on grass"}
    assert service.client.get(f"/api/v1/files/{fid}/download", headers=service.other).status_code == 404
    assert service.client.delete(f"/api/v1/files/{fid}", headers=service.user).status_code == 204
    assert not (service.settings.data_dir / "files" / fid[:2] / fid).exists()


@pytest.mark.parametrize(("entries", "links", "reason"), [
    ({"../evil.png": png(8, 8)}, None, "path traversal"),
    ({"ok/../../evil.png": png(8, 8)}, None, "path traversal"),
    ({"/etc/evil.png": png(8, 8)}, None, "absolute paths"),
    ({"a.png": png(8, 8)}, {"link.png": "/etc/passwd"}, "symbolic links"),
    ({"notes.txt": b"only text"}, None, "no readable image"),
    ({"huge.png": png(12_000, 12_000, "1")}, None, "decompression bomb"),
])
def test_unsafe_or_useless_zips_are_refused(service: Service, entries: dict[str, bytes], links: dict[str, str] | None,
                                            reason: str) -> None:
    before = count(service.client, service.user, "dataset")
    r = upload(service.client, service.user, make_zip(entries, links), "d.zip", url="/api/v1/datasets")
    assert r.status_code == 400, r.text
    assert reason in r.json()["detail"]
    assert count(service.client, service.user, "dataset") == before
    assert tmp_leftovers(service) == []
    assert not (service.settings.data_dir.parent / "evil.png").exists()


def test_not_a_zip(service: Service) -> None:
    r = upload(service.client, service.user, png(8, 8), "d.zip", url="/api/v1/datasets")
    assert r.status_code == 400
    assert r.json()["detail"] == "d.zip: not a zip file"


def test_zip_limits(small: TestClient, service: Service) -> None:
    url = "/api/v1/datasets"
    many = make_zip({f"img/{i}.png": png(8, 8) for i in range(6)})
    r = upload(small, service.user, many, "many.zip", url=url)
    assert r.status_code == 400
    assert "6 entries, more than the limit of 5" in r.json()["detail"]
    big = make_zip({"a.png": png(8, 8), "pad.txt": b"\0" * (2 << 20)})  # compresses to a few KiB
    r = upload(small, service.user, big, "big.zip", url=url)
    assert r.status_code == 400
    assert "uncompressed" in r.json()["detail"]
    r = upload(small, service.user, make_zip({"a.png": png(101, 100)}), "px.zip", url=url)
    assert r.status_code == 400
    assert "10100 pixels is over the limit of 10000" in r.json()["detail"]
    ok = upload(small, service.user, make_zip({"a.png": png(100, 100)}), "px.zip", url=url)
    assert ok.status_code == 201, ok.text


# --------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def base_model(service: Service) -> Path:
    m = models()
    return save_pipeline(service.settings.models_dir / "tiny-sd1", m["unet"], m["te"])


def test_register_model(service: Service, base_model: Path) -> None:
    r = service.client.post("/api/v1/models", headers=service.user, json={"path": "tiny-sd1"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "model"
    assert body["meta"]["family"] == "sd1"
    assert body["meta"]["format"] == "diffusers-folder"
    assert body["meta"]["layers"] > 0
    assert body["folder"] is True
    assert str(service.settings.models_dir) not in r.text
    again = service.client.post("/api/v1/models", headers=service.user, json={"path": str(base_model)})
    assert again.status_code == 200
    assert again.json()["id"] == body["id"]
    assert service.client.get(f"/api/v1/models/{body['id']}", headers=service.user).json() == body
    assert service.client.get(f"/api/v1/models/{body['id']}", headers=service.other).status_code == 404
    assert body["id"] in [m["id"] for m in service.client.get("/api/v1/models", headers=service.user).json()["items"]]
    # Unregistering leaves the model folder in place.
    assert service.client.delete(f"/api/v1/models/{body['id']}", headers=service.user).status_code == 204
    assert (base_model / "unet").is_dir()
    assert service.client.get(f"/api/v1/models/{body['id']}", headers=service.user).status_code == 404


def test_register_model_refusals(service: Service, base_model: Path) -> None:
    outside = service.settings.models_dir.parent / "outside.safetensors"
    outside.write_bytes(b"x")
    (service.settings.models_dir / "escape").symlink_to(outside)
    (service.settings.models_dir / "notes.txt").write_text("not a model")
    for path in ("../outside.safetensors", str(outside), "escape", "missing.safetensors", "."):
        r = service.client.post("/api/v1/models", headers=service.user, json={"path": path})
        assert r.status_code == 422, (path, r.text)
    r = service.client.post("/api/v1/models", headers=service.user, json={"path": "notes.txt"})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("notes.txt: ")
    assert service.client.post("/api/v1/models", headers=service.user, json={"path": "x", "bad": 1}).status_code == 422
