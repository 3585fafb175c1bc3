"""docker-compose.yml: its structure (parsed YAML), the Compose Specification schema, `docker compose config` where
the plugin exists, and the api / cpu-worker ``command:`` lines and health checks run as local processes against the
local Redis and PostgreSQL (the containers' host names and paths swapped for the local ones; everything else as
written)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_sv_serve import ADMIN_KEY, AUTH, clean_env, free_port, running, wait_job

from lyco_api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
LYCO_SERVICES = ("api", "cpu-worker", "gpu-worker-0")
WORKERS = ("cpu-worker", "gpu-worker-0")
#: LYCO_* names read by compose or the containers that are not Settings fields
COMPOSE_ONLY = {"LYCO_API_PORT", "LYCO_FLOWER_PORT", "LYCO_API_WORKERS", "LYCO_CPU_WORKER_QUEUES",
                "LYCO_CPU_WORKER_CONCURRENCY", "LYCO_FLOWER_BASIC_AUTH", "LYCO_WORKER_NODE"}

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation for what this file uses: ``${X}``, ``${X:-default}``, ``$$`` → ``$``."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping"
    return {k: str(v) for k, v in env.items()}


def test_compose_structure(compose: dict[str, Any]) -> None:
    svcs = compose["services"]
    assert set(svcs) == {"redis", "postgres", "api", "cpu-worker", "gpu-worker-0", "flower"}
    # profiles: the default stack runs anywhere; GPU workers and Flower are opt-in
    assert {n for n, s in svcs.items() if not s.get("profiles")} == {"redis", "postgres", "api", "cpu-worker"}
    assert svcs["gpu-worker-0"]["profiles"] == ["gpu"]
    assert svcs["flower"]["profiles"] == ["flower"]

    redis_cmd = " ".join(svcs["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert any(v.endswith(":/data") for v in svcs["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in svcs["postgres"]["volumes"])

    for name, svc in svcs.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name}: no health check"
        assert test[0] in ("CMD", "CMD-SHELL"), name
    # every dependency waits for health, and the workers wait for the API (it creates the tables)
    for name in (*LYCO_SERVICES, "flower"):
        deps = svcs[name]["depends_on"]
        assert all(d["condition"] == "service_healthy" for d in deps.values()), name
        assert "redis" in deps
    for name in WORKERS:
        assert set(svcs[name]["depends_on"]) == {"redis", "postgres", "api"}
        assert svcs[name]["stop_grace_period"]  # time to checkpoint before SIGKILL
    assert set(svcs["api"]["depends_on"]) == {"redis", "postgres"}

    gpu = svcs["gpu-worker-0"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert "gpu" in interpolate(svcs["cpu-worker"]["command"], {})[3].split(",")  # no GPU host: cpu worker takes gpu
    assert interpolate(svcs["gpu-worker-0"]["command"], {})[2:4] == ["--queues", "gpu"]

    # the Redis and PostgreSQL the Lyco services use are the compose ones; the env names are Settings fields
    fields = {f"LYCO_{f.upper()}" for f in Settings.model_fields}
    for name in LYCO_SERVICES:
        env = env_of(svcs[name])
        assert env["LYCO_BROKER_URL"] == "redis://redis:6379/0"
        assert env["LYCO_DATABASE_URL"].startswith("postgresql+psycopg://lyco:")
        assert env["LYCO_DATABASE_URL"].endswith("@postgres:5432/lyco")
        assert {k for k in env if k.startswith("LYCO_")} <= fields | COMPOSE_ONLY
        # volumes for the file store (uploads, datasets, outputs), models and the HF cache, where the env says
        targets = {v.split(":")[1] for v in svcs[name]["volumes"]}
        assert {env["LYCO_DATA_DIR"], env["LYCO_MODELS_DIR"], env["HF_HOME"]} <= targets
        assert svcs[name]["env_file"] == [{"path": ".env", "required": False}]
    declared = set(compose["volumes"])
    for svc in svcs.values():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            assert src.startswith(("/", ".")) or src in declared, f"volume {src} not declared"
    # each worker's health check pings its own node name (NODE@%h: %h is the container's hostname)
    for name in WORKERS:
        cmd = interpolate(svcs[name]["command"], {})
        assert cmd[cmd.index("--hostname") + 1] == env_of(svcs[name])["LYCO_WORKER_NODE"] + "@%h"
        assert '"$$LYCO_WORKER_NODE@$$HOSTNAME"' in svcs[name]["healthcheck"]["test"][1]


def test_dockerfiles_and_env_example(compose: dict[str, Any]) -> None:
    """Every build points at a Dockerfile whose COPY sources exist; .env.example names only real settings or
    variables the compose file reads."""
    for name in ("api", "cpu-worker", "gpu-worker-0"):
        build = compose["services"][name]["build"]
        dockerfile = ROOT / build["context"] / build["dockerfile"]
        text = dockerfile.read_text()
        for src in re.findall(r"^COPY\s+(\S+)\s+\S+", text, re.M):
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", text, re.M), f"{dockerfile}: no ARG {arg}"
    worker_df = (ROOT / "services/worker/Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", worker_df, re.M)  # GPU by default, CPU by build arg

    compose_text = COMPOSE.read_text()
    fields = {f"LYCO_{f.upper()}" for f in Settings.model_fields}
    names = set(re.findall(r"^#?\s*(LYCO_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert {"LYCO_ADMIN_KEY", "LYCO_DATABASE_URL", "LYCO_BROKER_URL", "LYCO_DATA_DIR"} <= names
    for n in names - fields:
        assert "${" + n in compose_text, f".env.example: {n} is neither a setting nor read by docker-compose.yml"


def test_docker_compose_config_validates() -> None:
    """`docker compose config` (the reference validator) where the compose plugin is installed, e.g. in CI."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not available here; this check runs where it is (CI)")
    for profiles in ([], ["--profile", "gpu", "--profile", "flower"]):
        r = subprocess.run([docker, "compose", "-f", str(COMPOSE), *profiles, "config", "--quiet"],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr


def _check_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against the Compose Specification's JSON schema (vendored by check-jsonschema)."""
    tool = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([str(tool), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True)


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any], tmp_path: Path) -> None:
    """The file as written, and as compose sees it after interpolation (defaults; every LYCO_* set), validates
    against the Compose Specification schema — what `docker compose config` checks first, runnable without
    Docker. A broken copy (an unknown condition, an unknown service key) fails the same check."""
    r = _check_compose_spec(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr
    for env in ({}, {n: "1" for n in COMPOSE_ONLY}):
        out = tmp_path / f"interpolated-{len(env)}.yml"
        out.write_text(yaml.safe_dump(interpolate(compose, env)))
        r = _check_compose_spec(out)
        assert r.returncode == 0, r.stdout + r.stderr
    broken = interpolate(compose, {})
    broken["services"]["api"]["depends_on"] = {"redis": {"condition": "service_ready"}}
    broken["services"]["cpu-worker"]["restart_policy"] = "always"
    bad = tmp_path / "broken.yml"
    bad.write_text(yaml.safe_dump(broken))
    r = _check_compose_spec(bad)
    assert r.returncode != 0
    assert "service_ready" in r.stdout + r.stderr


def local_argv(cmd: list[str]) -> list[str]:
    """A compose command as run here: ``lyco …`` through this venv. Until the lyco.commands entry points of
    lyco-api/lyco-worker are installed, ``lyco serve``/``lyco worker`` go through the same modules with ``-m``."""
    assert cmd[0] == "lyco"
    names = {e.name for e in entry_points(group="lyco.commands")}
    if cmd[1] in names:
        return [str(Path(sys.executable).with_name("lyco")), *cmd[1:]]
    module = {"serve": "lyco_api.serve", "worker": "lyco_worker.cli"}[cmd[1]]
    return [sys.executable, "-m", module, *cmd[2:]]


def test_compose_commands_run_against_local_services(compose: dict[str, Any], tmp_path: Path, pg_url: str,
                                                     redis_url: str) -> None:
    """The api and cpu-worker commands and health checks of the compose file, as local processes: /ready is 200,
    the worker's health check (celery inspect ping of its node) passes, and a GPU-queue job submitted to the API
    is run by the CPU worker (a host without GPUs)."""
    from lyco_trainer.models import write_tiny_pipeline

    svcs = compose["services"]
    port = free_port()
    compose_env = {"LYCO_API_PORT": str(port)}
    paths = {"/data": tmp_path / "data", "/models": tmp_path / "models", "/cache/huggingface": tmp_path / "hf"}
    write_tiny_pipeline(paths["/models"] / "tiny")

    def local_env(svc: dict[str, Any]) -> dict[str, str]:
        env = interpolate(env_of(svc), compose_env)
        assert env["LYCO_DATABASE_URL"].endswith("@postgres:5432/lyco")
        assert env["LYCO_BROKER_URL"].startswith("redis://redis:6379")
        env["LYCO_DATABASE_URL"], env["LYCO_BROKER_URL"] = pg_url, redis_url
        for k in ("LYCO_DATA_DIR", "LYCO_MODELS_DIR", "HF_HOME"):
            env[k] = str(paths[env[k]])
        env["LYCO_ADMIN_KEY"] = ADMIN_KEY  # from .env in a real deployment (env_file)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        env["HOSTNAME"] = socket.gethostname()  # docker sets it in every container
        return clean_env(**env)

    api_cmd = interpolate(svcs["api"]["command"], compose_env)
    api_cmd[api_cmd.index("--port") + 1] = str(port)  # the container's 8000 is published as LYCO_API_PORT
    worker_cmd = interpolate(svcs["cpu-worker"]["command"], compose_env)
    worker_env = local_env(svcs["cpu-worker"])
    with running(local_argv(api_cmd), port=port, cwd=tmp_path, env=local_env(svcs["api"]),
                 log=tmp_path / "api.log", ready_path="/api/v1/ready") as api:
        # the api's own health check, as compose runs it (port swapped)
        hc = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in svcs["api"]["healthcheck"]["test"][1:]]
        assert subprocess.run(hc, env=local_env(svcs["api"]), timeout=30).returncode == 0

        with open(tmp_path / "worker.log", "wb") as log:
            worker = subprocess.Popen(local_argv(worker_cmd), cwd=tmp_path, env=worker_env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            spec = {"base": "tiny", "prompts": ["compose"], "steps": 1, "width": 32, "height": 32, "device": "cpu"}
            r = httpx.post(api.url + "/api/v1/jobs/generate", json=spec, headers=AUTH, timeout=10)
            assert r.status_code == 202, r.text
            assert r.json()["queue"] == "gpu"
            job = wait_job(api, r.json()["id"], 120)
            wlog = (tmp_path / "worker.log").read_text(errors="replace")
            assert job["state"] == "succeeded", (job, wlog[-3000:])
            assert job["worker"].startswith(f"{worker_env['LYCO_WORKER_NODE']}@{socket.gethostname()}")

            hc_worker = svcs["cpu-worker"]["healthcheck"]["test"]
            assert hc_worker[0] == "CMD-SHELL"
            ping = subprocess.run(["sh", "-c", interpolate(hc_worker[1], {})], env=worker_env, timeout=60,
                                  capture_output=True, text=True)
            assert ping.returncode == 0, (shlex.join(hc_worker), ping.stdout, ping.stderr)
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
