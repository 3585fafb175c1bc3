"""Jobs: submit training / generation / evaluation, list, get, cancel, retry, progress as Server-Sent Events, logs.

Submitting validates the body with the engine's own pydantic config before anything is queued (422 with a one-line
``detail`` naming the key), resolves references to files, commits the job, then enqueues its id (202). References:

* a **registered file id** of the caller (``model.base`` → a ``model`` file, ``data.root`` / a concept ``path`` →
  a ``dataset``, an adapter → an ``adapter`` file), or
* a **path** under the server's models folder (``LYCO_MODELS_DIR``; relative paths are taken from there).

Anything else (another user's file, a path outside the models folder, a missing path) is a 422 naming the key. The
worker owns ``output.dir`` (the job's folder, ``<data_dir>/jobs/<id>/``): a given one is ignored. A training job
without ``output.state_every_steps`` writes a resumable state every 50 steps, so a lost worker costs little.

Events (``GET /jobs/{id}/events``): ``text/event-stream``; each event has ``id:`` (its database id), ``event:``
(``state``: a job state change; ``progress``; ``log``; ``start``, ``epoch``, ``save``, ``checkpoint`` (a resumable
training state), ``sample``, ``end``; ``redelivered``; ``cancel_requested``) and ``data:`` (JSON). The stream
resumes after ``Last-Event-ID`` (header, or ``?after=``) and ends after the ``state`` event of a final state
(succeeded, failed, cancelled).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from lyco_core.errors import LycoError

from ..auth import Principal, ReadPrincipal, SessionDep, SettingsDep, SubmitPrincipal, owned_or_404, visible
from ..db import Job, Session, StoredFile
from ..jobs import TERMINAL, create_job, events_after, request_cancel, retry_job, transition
from ..queue import BrokerUnavailableError, enqueue
from ..settings import Settings
from ..store import FileStore, resolve_under

router = APIRouter(prefix="/jobs", tags=["jobs"])

#: seconds between two database polls of an event stream, and between keep-alive comments
SSE_POLL_S = 0.25
SSE_KEEPALIVE_S = 15.0
#: most bytes ``/logs`` returns (the end of the log)
LOG_LIMIT = 1 << 20
DEFAULT_STATE_EVERY = 50
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def job_dir(settings: Settings, job_id: str) -> Path:
    """``<data_dir>/jobs/<id>``: the folder a worker runs the job in (states, outputs before registration, log)."""
    return Path(settings.data_dir) / "jobs" / job_id


# --------------------------------------------------------------------------------------------- schemas
class AdapterRef(BaseModel):
    """An adapter applied during generation."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="id of a registered adapter file, or a path under the models folder")
    strength: float = Field(1.0, ge=-10.0, le=10.0, description="multiplier of the adapter's change")


class GenerateSpec(BaseModel):
    """A generation job: every prompt × every seed, one image each, on ``base`` with ``adapters`` applied."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="id of a registered model, or a path under the models folder")
    adapters: list[AdapterRef] = Field(default_factory=list, max_length=16)
    prompts: list[Annotated[str, Field(max_length=2000)]] = Field(min_length=1, max_length=256)
    negative_prompt: str = Field("", max_length=2000)
    seeds: list[Annotated[int, Field(ge=0, lt=2**63)]] = Field(default_factory=lambda: [0], min_length=1,
                                                               max_length=64)
    steps: int = Field(25, ge=1, le=200)
    guidance: float = Field(7.0, ge=0.0, le=50.0)
    width: int = Field(512, ge=8, le=4096)
    height: int = Field(512, ge=8, le=4096)
    scheduler: Literal["ddim", "euler_a"] = "ddim"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"{v} is not a multiple of 8")
        return v


class JobOut(BaseModel):
    """A job as the API shows it. ``files``: the registered outputs (id, name, kind, role, size)."""

    id: str
    kind: str
    queue: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    files: list[dict[str, Any]]
    attempts: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        result = dict(job.result) if job.result is not None else None
        files = list((result or {}).get("files") or [])
        return cls(id=job.id, kind=job.kind, queue=job.queue, state=job.state, params=dict(job.params or {}),
                   progress=dict(job.progress) if job.progress is not None else None, result=result,
                   error=job.error, files=files, attempts=job.attempts, max_attempts=job.max_attempts,
                   worker=job.worker, cancel_requested=job.cancel_requested, created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at, duration_s=job.duration_s)


class JobList(BaseModel):
    items: list[JobOut]
    count: int = Field(description="jobs matching the filters (all pages)")


# --------------------------------------------------------------------------------------------- references
def _bad(msg: str) -> HTTPException:
    return HTTPException(422, msg)


class _Resolver:
    """Turns a body's file references (ids or paths) into absolute paths the worker can open."""

    def __init__(self, s: Any, principal: Principal, settings: Settings) -> None:
        self.s = s
        self.principal = principal
        self.settings = settings

    def file_path(self, f: StoredFile) -> Path:
        """Where a registered file or folder is (a store file, a store folder such as an extracted dataset, or a
        base model in the models folder), see :func:`lyco_api.uploads.stored_path`."""
        from ..uploads import stored_path

        return Path(stored_path(FileStore(self.settings.data_dir), Path(self.settings.models_dir), f))

    def __call__(self, key: str, value: Any, kinds: tuple[str, ...], *, optional: bool = False) -> str | None:
        if value is None or value == "":
            if optional:
                return None
            raise _bad(f"{key}: missing")
        if not isinstance(value, str):
            raise _bad(f"{key}: expected a file id or a path, got {type(value).__name__}")
        if _UUID.match(value):
            f = self.s.get(StoredFile, value)
            if f is None or (not self.principal.is_admin and f.user_id != self.principal.user_id):
                raise _bad(f"{key}: no file {value}")
            if f.kind not in kinds:
                raise _bad(f"{key}: file {value} is a {f.kind}, expected {' or '.join(kinds)}")
            try:
                p = self.file_path(f)
            except LycoError:
                raise _bad(f"{key}: file {value} is missing from the store") from None
            if not p.exists():
                raise _bad(f"{key}: file {value} is missing from the store")
            return str(p)
        under = resolve_under(Path(self.settings.models_dir), value)
        if under is None:
            raise _bad(f"{key}: {value!r} is neither a file id nor a path under the server's models folder")
        if not under.exists():
            raise _bad(f"{key}: {value!r}: no such file or folder in the models folder")
        return str(under)


def _dig(doc: dict[str, Any], key: str) -> dict[str, Any]:
    v = doc.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _bad(f"{key}: expected a table (JSON object)")
    return dict(v)


def _resolve_model(doc: dict[str, Any], res: _Resolver) -> None:
    model = _dig(doc, "model")
    model["base"] = res("model.base", model.get("base"), ("model",))
    for k in ("vae", "tokenizer", "config_dir"):
        if model.get(k) is not None:
            model[k] = res(f"model.{k}", model[k], ("model", "other"))
    doc["model"] = model


def _resolve_data(doc: dict[str, Any], res: _Resolver) -> None:
    if "data" not in doc:
        return
    data = _dig(doc, "data")
    if data.get("root") is not None:
        data["root"] = res("data.root", data["root"], ("dataset",))
    concepts = data.get("concepts")
    if isinstance(concepts, list):
        fixed = []
        for i, c in enumerate(concepts):
            if isinstance(c, dict) and c.get("path") is not None:
                c = {**c, "path": res(f"data.concepts.{i}.path", c["path"], ("dataset",))}
            fixed.append(c)
        data["concepts"] = fixed
    doc["data"] = data


def _validation(e: LycoError) -> HTTPException:
    return _bad(str(e).splitlines()[0] if str(e) else type(e).__name__)


def prepare_train(body: dict[str, Any], res: _Resolver) -> dict[str, Any]:
    """The training params: the config with references resolved and ``output.dir`` left to the worker."""
    from lyco_trainer.config import parse_config

    doc = dict(body)
    _resolve_model(doc, res)
    _resolve_data(doc, res)
    output = _dig(doc, "output")
    output.pop("dir", None)
    if output.get("state_every_steps") is None:
        output["state_every_steps"] = DEFAULT_STATE_EVERY
    doc["output"] = output
    try:
        parse_config({**doc, "output": {**output, "dir": "/tmp/lyco-check"}}, "config")
    except LycoError as e:
        raise _validation(e) from None
    return {"config": doc}


def prepare_evaluate(body: dict[str, Any], res: _Resolver) -> dict[str, Any]:
    """The evaluation params: the config with references resolved and ``output.dir`` left to the worker."""
    from lyco_evaluator.config import parse_config

    doc = dict(body)
    _resolve_model(doc, res)
    _resolve_data(doc, res)
    cks = doc.get("checkpoints")
    if isinstance(cks, list):
        fixed = []
        for i, c in enumerate(cks):
            if isinstance(c, dict) and c.get("path") is not None:
                c = {**c, "path": res(f"checkpoints.{i}.path", c["path"], ("adapter", "model"))}
            fixed.append(c)
        doc["checkpoints"] = fixed
    enc = _dig(doc, "encoders")
    for k in ("dinov2", "clip", "vgg19"):
        if enc.get(k) is not None:
            enc[k] = res(f"encoders.{k}", enc[k], ("model", "other"))
    if "encoders" in doc:
        doc["encoders"] = enc
    prompts = _dig(doc, "prompts")
    if prompts.get("templates") is not None:
        prompts["templates"] = res("prompts.templates", prompts["templates"], ("other",))
        doc["prompts"] = prompts
    output = _dig(doc, "output")
    output.pop("dir", None)
    doc["output"] = output
    try:
        parse_config({**doc, "output": {"dir": "/tmp/lyco-check"}}, "config")
    except LycoError as e:
        raise _validation(e) from None
    return {"config": doc}


def prepare_generate(spec: GenerateSpec, res: _Resolver) -> dict[str, Any]:
    """The generation params: the spec with ``base`` and adapter files resolved to paths."""
    doc = spec.model_dump(mode="json")
    doc["base"] = res("base", spec.base, ("model",))
    doc["adapters"] = [{"file": res(f"adapters.{i}.file", a.file, ("adapter",)), "strength": a.strength,
                        "ref": a.file} for i, a in enumerate(spec.adapters)]
    return {"spec": {**doc, "adapters": [{"file": a["file"], "strength": a["strength"]} for a in doc["adapters"]]},
            "refs": {"base": spec.base, "adapters": [a.file for a in spec.adapters]}}


def _submit(s: Any, principal: Principal, settings: Settings, kind: str, params: dict[str, Any]) -> JobOut:
    job = create_job(s, principal.user_id, kind, params, max_attempts=settings.max_attempts)
    s.commit()
    try:
        enqueue(job, settings)
    except BrokerUnavailableError as e:
        transition(s, job, "failed", error=str(e))
        s.commit()
        raise
    return JobOut.of(job)


_ACCEPTED: dict[int | str, dict[str, Any]] = {422: {"description": "invalid body (detail names the key)"},
                                              503: {"description": "the broker is unavailable"}}


@router.post("/train", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=_ACCEPTED)
def submit_train(body: dict[str, Any], principal: SubmitPrincipal, s: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a training job. The body is a trainer config (the tables of ``lyco train``'s TOML as JSON)."""
    return _submit(s, principal, settings, "train", prepare_train(body, _Resolver(s, principal, settings)))


@router.post("/generate", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=_ACCEPTED)
def submit_generate(spec: GenerateSpec, principal: SubmitPrincipal, s: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a generation job: images for every prompt × seed with the adapters applied at their strengths."""
    return _submit(s, principal, settings, "generate", prepare_generate(spec, _Resolver(s, principal, settings)))


@router.post("/evaluate", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, responses=_ACCEPTED)
def submit_evaluate(body: dict[str, Any], principal: SubmitPrincipal, s: SessionDep,
                    settings: SettingsDep) -> JobOut:
    """Queue an evaluation job. The body is an evaluator config (``lyco eval``'s TOML as JSON)."""
    return _submit(s, principal, settings, "evaluate", prepare_evaluate(body, _Resolver(s, principal, settings)))


# --------------------------------------------------------------------------------------------- reading
@router.get("", response_model=JobList)
def list_jobs(principal: ReadPrincipal, s: SessionDep,
              state: Annotated[Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
                               Query()] = None,
              kind: Annotated[Literal["train", "generate", "evaluate", "op"] | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> JobList:
    """The caller's jobs (an admin's: everyone's), newest first, filtered by state and kind."""
    stmt = visible(select(Job), Job, principal)
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    count = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = s.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return JobList(items=[JobOut.of(j) for j in rows], count=int(count))


def _job(s: OrmSession, job_id: str, principal: Principal) -> Job:
    return owned_or_404(s.get(Job, job_id), principal, "job")


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, principal: ReadPrincipal, s: SessionDep) -> JobOut:
    """One job: state, progress snapshot, result (metrics, files), error, attempts, worker, timestamps."""
    return JobOut.of(_job(s, job_id, principal))


@router.post("/{job_id}/cancel", response_model=JobOut, responses={409: {"description": "the job has ended"}})
def cancel_job(job_id: str, principal: SubmitPrincipal, s: SessionDep) -> JobOut:
    """Cancel: a queued job becomes ``cancelled`` now and never starts; a running one is asked to stop (a training
    saves a resumable state first) and becomes ``cancelled`` when it has."""
    job = _job(s, job_id, principal)
    request_cancel(s, job)
    s.commit()
    return JobOut.of(job)


@router.post("/{job_id}/retry", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={409: {"description": "the job is not failed or cancelled"}})
def retry(job_id: str, principal: SubmitPrincipal, s: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a failed or cancelled job again with a fresh attempt budget; a training resumes from its newest
    resumable state."""
    job = _job(s, job_id, principal)
    retry_job(s, job)
    s.commit()
    enqueue(job, settings)
    return JobOut.of(job)


def _sse(ev_id: int, kind: str, data: dict[str, Any]) -> str:
    return f"id: {ev_id}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _poll(engine: Any, job_id: str, after: int) -> tuple[list[tuple[int, str, dict[str, Any]]], str | None]:
    with Session(bind=engine) as s:
        evs = [(e.id, e.kind, dict(e.data or {})) for e in events_after(s, job_id, after, limit=500)]
        state = s.scalar(select(Job.state).where(Job.id == job_id))
    return evs, state


async def _stream(request: Request, job_id: str, after: int) -> AsyncIterator[str]:
    engine = request.app.state.engine
    last_sent = asyncio.get_running_loop().time()
    yield "retry: 2000\n\n"
    while True:
        evs, state = await run_in_threadpool(_poll, engine, job_id, after)
        for ev_id, kind, data in evs:
            after = ev_id
            yield _sse(ev_id, kind, data)
            last_sent = asyncio.get_running_loop().time()
            if kind == "state" and data.get("state") in TERMINAL:
                return
        if not evs and (state is None or state in TERMINAL):
            return  # ended, and its final event was sent before Last-Event-ID
        if await request.is_disconnected():
            return
        if asyncio.get_running_loop().time() - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = asyncio.get_running_loop().time()
        if len(evs) < 500:
            await asyncio.sleep(SSE_POLL_S)


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}})
def job_events(job_id: str, request: Request, principal: ReadPrincipal, s: SessionDep,
               last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
               after: Annotated[int | None, Query(ge=0, le=2**62, description="resume after this event id")] = None,
               ) -> StreamingResponse:
    """The job's events as Server-Sent Events (see the module doc); ends after the final state."""
    _job(s, job_id, principal)
    start = after or 0
    if last_event_id is not None and last_event_id.strip().isdigit():
        start = max(start, int(last_event_id.strip()))
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(request, job_id, start), media_type="text/event-stream", headers=headers)


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(job_id: str, principal: ReadPrincipal, s: SessionDep, settings: SettingsDep,
             tail: Annotated[int | None, Query(ge=1, le=100_000, description="only the last N lines")] = None,
             ) -> PlainTextResponse:
    """The job's log (every attempt: the worker's lines and the engine's log records), plain text."""
    job = _job(s, job_id, principal)
    path = job_dir(settings, job.id) / "job.log"
    text = ""
    if path.is_file():
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - LOG_LIMIT))
            text = f.read().decode("utf-8", errors="replace")
    if tail is not None:
        text = "\n".join(text.splitlines()[-tail:]) + ("\n" if text else "")
    return PlainTextResponse(text)


__all__ = ["GenerateSpec", "JobList", "JobOut", "job_dir", "router"]
