"""API keys and scopes: hashed storage, the 401/403/404 matrix, admin routes, the first admin key from the
environment and ``lyco admin create-key`` (a real subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import pytest
from conftest import Service, build_settings
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from lyco_api.app import create_app
from lyco_api.auth import (
    KEY_RE,
    Principal,
    ReadPrincipal,
    SessionDep,
    StoreDep,
    SubmitPrincipal,
    create_key,
    ensure_admin_key,
    expand_scopes,
    hash_key,
    owned_or_404,
    parse_scopes,
    principal_for_key,
    require,
    revoke_key,
    visible,
)
from lyco_api.db import ApiKey, Session, StoredFile, User, session_scope
from lyco_api.settings import Settings
from lyco_core.errors import InvalidConfigError

REPO = Path(__file__).resolve().parents[2]

demo = APIRouter(prefix="/demo", tags=["demo"])


@demo.get("/files")
def demo_list(s: SessionDep, p: ReadPrincipal) -> list[str]:
    return sorted(s.scalars(visible(select(StoredFile.name), StoredFile, p)))


@demo.get("/files/{file_id}")
def demo_get(file_id: str, s: SessionDep, p: ReadPrincipal) -> dict[str, Any]:
    f = owned_or_404(s.get(StoredFile, file_id), p, "file")
    return {"id": f.id, "name": f.name}


@demo.post("/files", status_code=201)
def demo_upload(name: str, s: SessionDep, store: StoreDep, p: SubmitPrincipal) -> dict[str, Any]:
    f = store.add(s, p.user_id, "other", name.encode(), name)
    s.commit()
    return {"id": f.id}


@demo.delete("/everything")
def demo_admin(p: Annotated[Principal, Depends(require("admin"))]) -> dict[str, bool]:
    return {"admin": p.is_admin}


@pytest.fixture(scope="module")
def svc(service: Service) -> Service:
    service.app.include_router(demo, prefix="/api/v1")
    return service


def _h(key: str, style: str = "bearer") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if style == "bearer" else {"X-API-Key": key}


def _new_key(svc: Service, name: str, scopes: list[str], admin: bool = False) -> str:
    with session_scope(svc.app.state.engine) as s:
        return create_key(s, name, scopes, admin=admin)[1]


# ---- keys and scopes ------------------------------------------------------------------------------------------


def test_scopes_are_hierarchical() -> None:
    assert expand_scopes(["read"]) == {"read"}
    assert expand_scopes(["submit"]) == {"read", "submit"}
    assert expand_scopes(["admin"]) == {"read", "submit", "admin"}
    assert expand_scopes(["read", "admin"]) == {"read", "submit", "admin"}
    assert expand_scopes([]) == frozenset()
    assert parse_scopes(" read, submit,read ") == ["read", "submit"]
    with pytest.raises(InvalidConfigError, match="'write'"):
        parse_scopes("read,write")
    with pytest.raises(InvalidConfigError, match="no scopes"):
        parse_scopes(" , ")


def test_keys_are_stored_hashed(svc: Service) -> None:
    with session_scope(svc.app.state.engine) as s:
        row, key = create_key(s, "hash-check", ["read"])
        kid = row.id
    m = KEY_RE.match(key)
    assert m is not None
    assert len(key) >= 50
    with svc.app.state.engine.connect() as conn:
        stored = conn.execute(text("SELECT * FROM api_keys WHERE id = :i"), {"i": kid}).mappings().one()
    assert stored["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert stored["prefix"] == m.group(1)
    assert all(m.group(2) not in str(v) for v in stored.values())  # the secret is nowhere in the row
    with session_scope(svc.app.state.engine) as s:
        _, key2 = create_key(s, "hash-check", ["read"])
        assert key2 != key
        assert s.scalar(select(func.count()).select_from(User).where(User.name == "hash-check")) == 1


# ---- 401 / 403 / 404 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer lyco_deadbeef_" + "x" * 43},
    {"X-API-Key": "not-a-key"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
])
def test_401_without_a_valid_key(svc: Service, headers: dict[str, str]) -> None:
    for method, path in (("get", "/api/v1/me"), ("get", "/api/v1/demo/files"), ("get", "/api/v1/admin/keys"),
                         ("post", "/api/v1/demo/files?name=x")):
        r = svc.client.request(method, path, headers=headers)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()) == {"detail"}


def test_both_headers_work(svc: Service) -> None:
    for style in ("bearer", "x-api-key"):
        r = svc.client.get("/api/v1/me", headers=_h(svc.user_key, style))
        assert r.status_code == 200
        assert r.json()["user"] == "alice"
        assert r.json()["scopes"] == ["read", "submit"]
        assert r.json()["is_admin"] is False


def test_403_for_missing_scope(svc: Service) -> None:
    reader = _new_key(svc, "reader", ["read"])
    c = svc.client
    assert c.get("/api/v1/demo/files", headers=_h(reader)).status_code == 200
    r = c.post("/api/v1/demo/files?name=x", headers=_h(reader))
    assert r.status_code == 403
    assert r.json() == {"detail": "this API key lacks the 'submit' scope"}
    for key in (reader, svc.user_key):
        assert c.delete("/api/v1/demo/everything", headers=_h(key)).status_code == 403
        assert c.get("/api/v1/admin/keys", headers=_h(key)).status_code == 403
        assert c.post("/api/v1/admin/keys", json={"name": "x"}, headers=_h(key)).status_code == 403
    assert c.post("/api/v1/demo/files?name=x", headers=_h(svc.user_key)).status_code == 201
    assert c.delete("/api/v1/demo/everything", headers=svc.admin).json() == {"admin": True}


def test_admin_scope_needs_an_admin_user(svc: Service) -> None:
    """An ``admin`` scope on a key of a non-admin user (written straight into the DB) grants no admin rights."""
    key = _new_key(svc, "sneaky", ["submit"])
    with session_scope(svc.app.state.engine) as s:
        row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
        assert row is not None
        row.scopes = ["admin"]
    me = svc.client.get("/api/v1/me", headers=_h(key)).json()
    assert me["is_admin"] is False
    assert me["scopes"] == ["read", "submit"]
    assert svc.client.get("/api/v1/admin/keys", headers=_h(key)).status_code == 403


def test_404_for_other_users_objects(svc: Service) -> None:
    c = svc.client
    alice_file = c.post("/api/v1/demo/files?name=alice.txt", headers=svc.user).json()["id"]
    bob_file = c.post("/api/v1/demo/files?name=bob.txt", headers=svc.other).json()["id"]
    assert c.get(f"/api/v1/demo/files/{alice_file}", headers=svc.user).json()["name"] == "alice.txt"
    not_yours = c.get(f"/api/v1/demo/files/{alice_file}", headers=svc.other)
    missing = c.get("/api/v1/demo/files/00000000-0000-0000-0000-000000000000", headers=svc.other)
    assert not_yours.status_code == missing.status_code == 404
    assert not_yours.json() == missing.json() == {"detail": "file not found"}  # indistinguishable
    assert c.get(f"/api/v1/demo/files/{bob_file}", headers=svc.user).status_code == 404
    # admins see everything
    assert c.get(f"/api/v1/demo/files/{alice_file}", headers=svc.admin).status_code == 200
    assert c.get(f"/api/v1/demo/files/{bob_file}", headers=svc.admin).status_code == 200
    # lists are filtered the same way
    alice_names = c.get("/api/v1/demo/files", headers=svc.user).json()
    assert "alice.txt" in alice_names
    assert "bob.txt" not in alice_names
    all_names = c.get("/api/v1/demo/files", headers=svc.admin).json()
    assert {"alice.txt", "bob.txt"} <= set(all_names)


# ---- admin routes ---------------------------------------------------------------------------------------------


def test_admin_routes_create_list_revoke(svc: Service) -> None:
    c = svc.client
    r = c.post("/api/v1/admin/keys", json={"name": "carol", "scopes": ["read"]}, headers=svc.admin)
    assert r.status_code == 201
    body = r.json()
    key = body["key"]
    assert KEY_RE.match(key)
    assert body["user"] == "carol"
    assert body["scopes"] == ["read"]
    assert c.get("/api/v1/me", headers=_h(key)).json()["scopes"] == ["read"]
    listed = c.get("/api/v1/admin/keys", headers=svc.admin)
    assert listed.status_code == 200
    assert key not in listed.text
    assert body["prefix"] in listed.text
    assert c.post("/api/v1/admin/keys", json={"name": "x", "scopes": ["root"]}, headers=svc.admin).status_code == 400
    assert c.delete("/api/v1/admin/keys/nope1234", headers=svc.admin).status_code == 404
    r = c.delete(f"/api/v1/admin/keys/{body['prefix']}", headers=svc.admin)
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    r = c.get("/api/v1/me", headers=_h(key))
    assert r.status_code == 401
    assert r.json() == {"detail": "invalid or revoked API key"}


# ---- first admin key from the environment ---------------------------------------------------------------------


def test_admin_key_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sqlite_url: str) -> None:
    env_key = "my-operator-chosen-admin-key-0123"
    monkeypatch.setenv("LYCO_ADMIN_KEY", env_key)
    monkeypatch.setenv("LYCO_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("LYCO_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("LYCO_BROKER_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # a restart must not add a second key
        app = create_app(Settings())
        with TestClient(app) as c:
            me = c.get("/api/v1/me", headers=_h(env_key)).json()
            assert me["is_admin"] is True
            assert me["scopes"] == ["read", "submit", "admin"]
            assert c.get("/api/v1/admin/keys", headers=_h(env_key)).status_code == 200
    with Session(bind=app.state.engine) as s:
        assert s.scalar(select(func.count()).select_from(ApiKey)) == 1
        row = s.scalar(select(ApiKey))
        assert row is not None
        assert row.key_hash == hash_key(env_key)
        assert env_key not in row.prefix
    # a revoked environment key stays revoked across restarts
    with session_scope(app.state.engine) as s:
        revoke_key(s, row.prefix)
    with TestClient(create_app(Settings())) as c:
        assert c.get("/api/v1/me", headers=_h(env_key)).status_code == 401


def test_admin_key_created_once_under_concurrent_starts(svc: Service) -> None:
    key = "concurrent-start-admin-key-" + "z" * 10
    engine = svc.app.state.engine
    barrier = threading.Barrier(4)
    added: list[bool] = []

    def start() -> None:
        barrier.wait()
        added.append(ensure_admin_key(engine, key, user_name="ops"))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(added) == [False, False, False, True]
    with Session(bind=engine) as s:
        assert s.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.key_hash == hash_key(key))) == 1
        p = principal_for_key(s, key)
        assert p is not None
        assert p.is_admin


# ---- lyco admin (subprocess) ----------------------------------------------------------------------------------


def _lyco_admin(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``lyco admin`` as a real process (what an operator runs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYCO_")}
    return subprocess.run([sys.executable, "-m", "lyco_api.cli", "admin", "--database-url", db_url, *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def _lyco_admin_inproc(capsys: pytest.CaptureFixture[str], db_url: str, *args: str) -> tuple[int, str, str]:
    """The same command in this process (faster: no interpreter and torch start-up)."""
    from lyco_api.cli import main

    capsys.readouterr()
    rc = main(["admin", "--database-url", db_url, *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_create_list_revoke(svc: Service, pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    r = _lyco_admin(pg_url, "create-key", "--name", "dave", "--scopes", "read")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert r.stdout.count("\n") == 1
    assert KEY_RE.match(key)
    assert "not shown again" in r.stderr
    assert svc.client.get("/api/v1/me", headers=_h(key)).json()["scopes"] == ["read"]
    assert svc.client.post("/api/v1/demo/files?name=d", headers=_h(key)).status_code == 403

    rc, out, _ = _lyco_admin_inproc(capsys, pg_url, "create-key", "--name", "erin", "--admin")
    admin_key = out.strip()
    assert rc == 0
    me = svc.client.get("/api/v1/me", headers=_h(admin_key)).json()
    assert me["is_admin"] is True
    assert me["user"] == "erin"

    rc, out, _ = _lyco_admin_inproc(capsys, pg_url, "list-keys", "--json")
    keys = json.loads(out)
    prefix = KEY_RE.match(key).group(1)  # type: ignore[union-attr]
    assert {"prefix": prefix, "user": "dave", "scopes": ["read"]}.items() <= next(
        k for k in keys if k["prefix"] == prefix).items()
    assert key not in out
    assert admin_key not in out
    rc, out, _ = _lyco_admin_inproc(capsys, pg_url, "list-keys")
    assert re.search(rf"^{prefix}\s+dave\s+read\s", out, re.M)
    assert key not in out

    rc, _, err = _lyco_admin_inproc(capsys, pg_url, "revoke-key", prefix)
    assert rc == 0
    assert prefix in err
    assert svc.client.get("/api/v1/me", headers=_h(key)).status_code == 401


def test_cli_errors_are_one_line(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _lyco_admin_inproc(capsys, pg_url, "create-key", "--name", "x", "--scopes", "read,sudo")
    assert (rc, out, err) == (2, "", "lyco: error: unknown scope 'sudo'; scopes are read, submit, admin\n")
    rc, out, err = _lyco_admin_inproc(capsys, pg_url, "revoke-key", "ffffffff")
    assert (rc, out, err) == (2, "", "lyco: error: no API key with prefix 'ffffffff'\n")


def test_cli_registers_under_lyco(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``register_admin`` plugs into the ``lyco`` parser; with no database option it uses LYCO_DATA_DIR's SQLite."""
    import argparse

    from lyco_api.cli import register_admin

    monkeypatch.setenv("LYCO_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="lyco")
    register_admin(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["admin", "create-key", "--name", "frank", "--scopes", "submit"])
    assert args.func(args) == 0
    settings = build_settings(tmp_path)
    assert Path(settings.database_url.removeprefix("sqlite:///")).exists()
    from lyco_api.db import make_engine

    engine = make_engine(settings.database_url)
    with Session(bind=engine) as s:
        row = s.scalar(select(ApiKey).join(User).where(User.name == "frank"))
        assert row is not None
        assert row.scopes == ["submit"]
    engine.dispose()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parser.parse_args(["admin", "create-key", "--help"])
    help_text = capsys.readouterr().out
    assert "--scopes" in help_text
    assert "--admin" in help_text
    assert "--name" in help_text
    assert re.search(r"read,\s*submit", help_text)



# ---- the per-process key cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0.0, 1.0])
def test_key_revoked_by_another_process_stops_working_within_the_cache_time(svc: Service, tmp_path: Path,
                                                                            ttl: float) -> None:
    """Another API process (here: the database row changed behind this app's back) revokes a key: this process
    trusts it for at most ``auth_cache_s`` more seconds; a revocation through this process is immediate."""
    import time

    settings = build_settings(tmp_path / "d", database_url=svc.settings.database_url,
                              broker_url=svc.settings.broker_url, auth_cache_s=ttl)
    with TestClient(create_app(settings)) as c:
        r = c.post("/api/v1/admin/keys", json={"name": f"cache-{ttl}", "scopes": ["read"]}, headers=svc.admin)
        key, prefix = r.json()["key"], r.json()["prefix"]
        assert c.get("/api/v1/me", headers=_h(key)).status_code == 200  # looked up, now trusted for ttl
        with session_scope(c.app.state.engine) as s:  # type: ignore[attr-defined]
            s.execute(text("UPDATE api_keys SET revoked_at = now() WHERE prefix = :p"), {"p": prefix})
        revoked_at = time.monotonic()
        codes = []
        while time.monotonic() - revoked_at < ttl + 1.0:
            codes.append(c.get("/api/v1/me", headers=_h(key)).status_code)
            if codes[-1] == 401:
                break
            time.sleep(0.05)
        assert codes[-1] == 401
        assert time.monotonic() - revoked_at <= ttl + 0.5
        if ttl == 0:
            assert codes == [401]
        else:
            assert codes[0] == 200  # still trusted right after

        r = c.post("/api/v1/admin/keys", json={"name": f"cache2-{ttl}", "scopes": ["read"]}, headers=svc.admin)
        key2, prefix2 = r.json()["key"], r.json()["prefix"]
        assert c.get("/api/v1/me", headers=_h(key2)).status_code == 200
        assert c.delete(f"/api/v1/admin/keys/{prefix2}", headers=svc.admin).status_code == 200
        assert c.get("/api/v1/me", headers=_h(key2)).status_code == 401  # through this process: at once
