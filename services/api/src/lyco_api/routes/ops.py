"""Adapter operations: ``POST /api/v1/ops/<op>`` for inspect, check, bake, merge, rescale, resize, convert, extract.

Each is the :mod:`lyco_core.ops` function of the same name (the options are those of ``lyco adapter <op>``), run as
a job on the ``cpu`` queue: the route checks the body (422) and that every file it names is the caller's and of the
right kind (404 / 422), commits a ``Job(kind="op")`` whose params the worker reads (:mod:`lyco_worker.runners.ops`)::

    {"op": "merge", "inputs": {"adapters": ["/abs/path", …], "base": "/abs/path"},
     "options": {"weights": [1.0, 0.5], "rank": 8}, "output_name": "merged.safetensors", "refs": {path: id}}

enqueues it, and waits up to ``settings.op_wait_s`` for it to end. Answers: **200** ``{job_id, state, report,
file}`` (``file``: the new stored file, ``None`` for inspect and check); **400** ``{detail, job_id}`` when the
operation refused its input (one line naming the option or file); **202** ``{job_id, state}`` with a ``Location``
to ``GET /api/v1/ops/jobs/{job_id}`` when it takes longer. Paths in reports are replaced by the file ids.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import opcache
from ..auth import Principal, ReadPrincipal, SubmitPrincipal, owned_or_404
from ..db import Job, Session, StoredFile
from ..jobs import TERMINAL, create_answered_job, create_job, transition
from ..queue import BrokerUnavailableError, enqueue
from ..settings import Settings
from ..uploads import MODELS_DIR, stored_path
from .files import ID_RE, FileOut

router = APIRouter(prefix="/ops", tags=["ops"])

#: Names of the operations, as in ``lyco adapter <op>``.
OPS = ("inspect", "check", "bake", "merge", "rescale", "resize", "convert", "extract")
#: First and longest pause between two database polls while a request waits for its job (seconds).
POLL_FIRST_S = 0.01
POLL_MAX_S = 0.1

Dtype = Literal["fp32", "fp16", "bf16"]
Method = Literal["auto", "full", "randomized"]
Family = Literal["sd1", "sd2", "sdxl"]
FileId = Annotated[str, Field(min_length=1, max_length=64, description="id of one of your adapter files")]
ModelId = Annotated[str, Field(min_length=1, max_length=64, description="id of one of your models (POST /models)")]
Rank = Annotated[int, Field(ge=1, le=65536)]
Weight = Annotated[float, Field(ge=-1e6, le=1e6)]
OutName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$",
                               description="name of the output file (default: <input>-<op>.safetensors)")]


class OpBody(BaseModel):
    """Options every operation request shares: unknown keys and non-finite numbers are refused (422)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def inputs(self) -> dict[str, str | list[str]]:
        """Worker input name → stored id(s) (see :data:`lyco_worker.runners.ops.OPS`)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Keyword arguments of the core function (only those given)."""
        return {}

    def kinds(self) -> dict[str, str]:
        """Worker input name → the StoredFile kind it must be."""
        return {"adapter": "adapter", "adapters": "adapter", "base": "model", "tuned": "model", "from_base": "model"}


def _given(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def _opt(**kw: Any) -> dict[str, str | list[str]]:
    return {k: v for k, v in kw.items() if v is not None}


class InspectBody(OpBody):
    """``lyco adapter inspect FILE``: algorithms, ranks, base family, metadata, payload hash (no output file)."""

    file_id: FileId
    modules: bool = Field(False, description="include the per-module table (key → algo, rank, alpha, …)")

    def inputs(self) -> dict[str, str | list[str]]:
        return {"adapter": self.file_id}


class CheckBody(OpBody):
    """``lyco adapter check FILE --base BASE``: which modules load into the base model (no output file)."""

    file_id: FileId
    base_model_id: ModelId

    def inputs(self) -> dict[str, str | list[str]]:
        return {"adapter": self.file_id, "base": self.base_model_id}


class BakeBody(OpBody):
    """``lyco adapter bake BASE ADAPTER… [-m M…] [--skip-unmatched]``: the base with the adapters merged in."""

    base_model_id: ModelId
    file_ids: list[FileId] = Field(min_length=1, max_length=32, description="adapters, applied in this order")
    multipliers: list[Weight] | None = Field(None, min_length=1, max_length=32,
                                             description="strength per adapter, or one value for all (default 1)")
    skip_unmatched: bool = Field(False, description="bake the modules that fit and list the others")
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return {"base": self.base_model_id, "adapters": list(self.file_ids)}

    def options(self) -> dict[str, Any]:
        return _given(multipliers=self.multipliers, skip_unmatched=self.skip_unmatched)


class MergeBody(OpBody):
    """``lyco adapter merge A B … [--weights W…] [--rank R] …``: one adapter whose effect is Σ wᵢ·ΔWᵢ."""

    file_ids: list[FileId] = Field(min_length=1, max_length=32)
    weights: list[Weight] | None = Field(None, max_length=32, description="one per adapter (default 1.0 each)")
    rank: Rank | None = Field(None, description="re-extract every module as a LoRA of rank ≤ R (default: exact)")
    conv_rank: Rank | None = Field(None, description="with rank: rank of convs with a kernel larger than 1×1")
    method: Method = Field("auto", description="with rank: SVD of dense sums")
    base_model_id: ModelId | None = Field(None, description="base for DoRA, OFT/BOFT, GLoRA, mixed (IA)³ modules")
    drop_unsupported: bool = Field(False, description="drop what cannot be merged without a base, and list it")
    dtype: Dtype | None = None
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return _opt(adapters=list(self.file_ids), base=self.base_model_id)

    def options(self) -> dict[str, Any]:
        return _given(weights=self.weights, rank=self.rank, conv_rank=self.conv_rank, method=self.method,
                      allow_drop=self.drop_unsupported, dtype=self.dtype)


class RescaleBody(OpBody):
    """``lyco adapter rescale FILE (--multiplier M | --alpha A) [--base BASE]``."""

    file_id: FileId
    multiplier: Weight | None = Field(None, description="strength folded in: the output at 1 = the input at M")
    alpha: float | None = Field(None, gt=0, le=1e6, description="new stored alpha; the weight change is kept")
    base_model_id: ModelId | None = Field(None, description="needed with a multiplier for DoRA/OFT/BOFT modules")
    dtype: Dtype | None = None
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return _opt(adapter=self.file_id, base=self.base_model_id)

    def options(self) -> dict[str, Any]:
        return _given(multiplier=self.multiplier, alpha=self.alpha, dtype=self.dtype)


class ResizeBody(OpBody):
    """``lyco adapter resize FILE (--rank R | --dynamic MODE --param P) …``: SVD re-rank to LoRA/LoCon."""

    file_id: FileId
    rank: Rank | None = Field(None, description="new rank; with dynamic, the largest rank allowed")
    dynamic: Literal["threshold", "ratio", "quantile", "sv_ratio", "sv_fro", "sv_cumulative"] | None = None
    param: float | None = Field(None, ge=-1e12, le=1e12, description="parameter of the dynamic rule")
    conv_rank: Rank | None = None
    method: Method = "auto"
    base_model_id: ModelId | None = None
    drop_unsupported: bool = False
    dtype: Dtype | None = None
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return _opt(adapter=self.file_id, base=self.base_model_id)

    def options(self) -> dict[str, Any]:
        return _given(rank=self.rank, dynamic=self.dynamic, param=self.param, conv_rank=self.conv_rank,
                      method=self.method, allow_drop=self.drop_unsupported, dtype=self.dtype)


class ConvertBody(OpBody):
    """``lyco adapter convert FILE --to kohya|peft|diffusers|comfy …`` (a PEFT folder is stored as a zip)."""

    file_id: FileId
    to: Literal["kohya", "peft", "diffusers", "comfy"]
    naming: Literal["diffusers", "ldm"] | None = None
    family: Family | None = None
    algo: Literal["lora", "full"] | None = None
    rank: Rank | None = None
    conv_rank: Rank | None = None
    dora_axis: Literal["output", "input"] | None = None
    dtype: Dtype | None = None
    to_base: Family | None = None
    base_model_id: ModelId | None = None
    from_base_model_id: ModelId | None = None
    project_rank: Rank | None = None
    allow_loss: bool = False
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return _opt(adapter=self.file_id, base=self.base_model_id, from_base=self.from_base_model_id)

    def options(self) -> dict[str, Any]:
        return _given(to=self.to, naming=self.naming, family=self.family, algo=self.algo, rank=self.rank,
                      conv_rank=self.conv_rank, dora_axis=self.dora_axis, dtype=self.dtype, to_base=self.to_base,
                      project_rank=self.project_rank, allow_loss=self.allow_loss)


class ExtractBody(OpBody):
    """``lyco adapter extract BASE TUNED (--rank R | --mode M --param P) …``: a LoRA/LoCon of TUNED − BASE."""

    base_model_id: ModelId
    tuned_model_id: ModelId
    rank: Rank | None = Field(None, description="rank of every linear module (with a mode rule: the cap)")
    mode: Literal["fixed", "threshold", "ratio", "quantile"] = "fixed"
    param: float | None = Field(None, ge=-1e12, le=1e12, description="P of the mode rule")
    conv_rank: Rank | None = Field(None, description="also extract resnet/sampler layers; 3×3 convs at this rank")
    tucker: bool = False
    svd: Method = "auto"
    min_diff: float = Field(0.0, ge=0, le=1e12, description="skip layers whose max |ΔW| is at most this")
    text_encoder: bool = Field(True, description="false: the UNet only")
    dtype: Dtype = "fp32"
    name: OutName | None = None

    def inputs(self) -> dict[str, str | list[str]]:
        return {"base": self.base_model_id, "tuned": self.tuned_model_id}

    def options(self) -> dict[str, Any]:
        return _given(rank=self.rank, mode=self.mode, param=self.param, conv_rank=self.conv_rank, tucker=self.tucker,
                      method=self.svd, min_diff=self.min_diff, text_encoder=self.text_encoder, dtype=self.dtype)


BODIES: dict[str, type[OpBody]] = {
    "inspect": InspectBody, "check": CheckBody, "bake": BakeBody, "merge": MergeBody, "rescale": RescaleBody,
    "resize": ResizeBody, "convert": ConvertBody, "extract": ExtractBody,
}


class OpOut(BaseModel):
    """An operation's job and, once it succeeded, its report and the new file."""

    job_id: str
    op: str
    state: str
    report: dict[str, Any] | None = Field(None, description="the operation's report (OpReport, CheckReport, inspect)")
    file: FileOut | None = Field(None, description="the output, registered in the store (None: inspect, check)")
    error: str | None = None


# --------------------------------------------------------------------------------------------- submitting
def _prepare(s: Any, principal: Principal, settings: Settings, store: Any, op: str, body: OpBody) -> dict[str, Any]:
    """The job params: ids checked (the caller's, right kind) and resolved to absolute paths."""
    kinds = body.kinds()
    refs: dict[str, str] = {}
    inputs: dict[str, str | list[str]] = {}
    hashes: dict[str, str | list[str]] = {}
    store_files = True
    first_name: str | None = None
    folder_base = False
    for name, value in body.inputs().items():
        paths: list[str] = []
        digests: list[str] = []
        for fid in value if isinstance(value, list) else [value]:
            f = owned_or_404(s.get(StoredFile, fid) if ID_RE.fullmatch(fid) else None, principal, f"file {fid!r}")
            if f.kind != kinds[name]:
                raise HTTPException(422,
                                    f"{name}: file {fid} is a {f.kind}, expected a {kinds[name]}")
            p = stored_path(store, settings.models_dir, f)
            paths.append(str(p))
            digests.append(f.sha256)
            store_files = store_files and (f.meta or {}).get("location") != MODELS_DIR
            refs[str(p)] = fid
            if first_name is None and name in ("adapter", "adapters", "tuned"):
                first_name = f.name
            if name == "base" and op == "bake" and p.is_dir():
                folder_base = True
        inputs[name] = paths if isinstance(value, list) else paths[0]
        hashes[name] = digests if isinstance(value, list) else digests[0]
    params: dict[str, Any] = {"op": op, "inputs": inputs, "options": body.options(), "refs": refs}
    key = opcache.result_key(op, hashes, params["options"]) if store_files else None
    if key is not None:
        params["cache_key"] = key
    if isinstance(body, InspectBody) and body.modules:
        params["api"] = {"modules": True}
    if op not in ("inspect", "check"):
        out_name: str | None = getattr(body, "name", None)
        if not out_name:
            stem = re.sub(r"[^A-Za-z0-9_+-]", "_", Path(first_name or "output").name.split(".")[0])[:100]
            folder = folder_base or (isinstance(body, ConvertBody) and body.to == "peft")
            out_name = f"{stem or 'output'}-{op}" if folder else f"{stem or 'output'}-{op}.safetensors"
        params["output_name"] = out_name
    return params


def _submit(engine: Any, principal: Principal, settings: Settings, store: Any, op: str,
            body: OpBody) -> tuple[str, Job | None]:
    """Queue the op job; returns its id, and the job itself when it was answered from :mod:`lyco_api.opcache`."""
    with Session(bind=engine) as s:
        params = _prepare(s, principal, settings, store, op, body)
        key = params.get("cache_key")
        report = opcache.lookup(s, key) if key else None
        if report is not None:  # the job row refers to the kept report instead of holding a copy of it
            job = create_answered_job(s, principal.user_id, "op", params,
                                      {"op": op, "cached": True, "report_key": key}, "cpu")
            s.commit()
            s.expunge(job)
            job.result = {**(job.result or {}), "report": report}  # detached: answered from here, not stored
            return job.id, job
        job = create_job(s, principal.user_id, "op", params, "cpu", max_attempts=settings.max_attempts)
        s.commit()
        try:
            enqueue(job, settings)
        except BrokerUnavailableError as e:
            transition(s, job, "failed", error=str(e))
            s.commit()
            raise
        return job.id, None


def _snapshot(engine: Any, job_id: str) -> tuple[str, Job]:
    with Session(bind=engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job.state, job


def _scrub(data: Any, subs: list[tuple[str, str]]) -> Any:
    """``data`` with every server path replaced by what the client knows (file ids, the output's name)."""
    if isinstance(data, str):
        for old, new in subs:
            if old in data:
                data = data.replace(old, new)
        return data
    if isinstance(data, dict):
        return {_scrub(k, subs): _scrub(v, subs) for k, v in data.items()}
    if isinstance(data, list):
        return [_scrub(v, subs) for v in data]
    return data


def op_out(engine: Any, settings: Settings, job: Job) -> OpOut:
    """The answer for an op job in any state (report scrubbed of server paths, output file looked up)."""
    from .jobs import job_dir

    params = job.params or {}
    op = str(params.get("op", "?"))
    out = OpOut(job_id=job.id, op=op, state=job.state, error=job.error)
    result = dict(job.result or {})
    key = params.get("cache_key")
    if job.state == "succeeded" and result.get("cached") and "report" not in result:
        with Session(bind=engine) as s:
            result["report"] = opcache.lookup(s, str(result.get("report_key"))) or {}
    elif job.state == "succeeded" and key and not result.get("cached") and isinstance(result.get("report"), dict):
        with Session(bind=engine) as s:
            opcache.remember(s, key, op, result["report"])
            s.commit()
    if job.state == "succeeded" and "report" in result:
        if result.get("cached"):  # kept without server paths: nothing to scrub
            report = dict(result["report"])
        else:
            refs = params.get("refs") or {}
            subs = sorted(((str(k), str(v)) for k, v in refs.items()), key=lambda kv: -len(kv[0]))
            subs.append((str(job_dir(settings, job.id) / "out") + "/", ""))
            subs.append((str(settings.data_dir), "<data>"))
            subs.append((str(settings.models_dir), "<models>"))
            report = _scrub(result["report"], subs)
        if isinstance(report, dict) and op == "inspect":
            report.pop("file", None)
            if not (params.get("api") or {}).get("modules"):
                report.pop("modules", None)
        out.report = report if isinstance(report, dict) else {"value": report}
        fid = result.get("file_id")
        if fid:
            with Session(bind=engine) as s:
                f = s.get(StoredFile, fid)
                out.file = FileOut.of(f) if f is not None else None
    return out


async def run_op(request: Request, response: Response, principal: Principal, op: str, body: OpBody) -> Any:
    """Submit ``op`` as a job and wait up to ``op_wait_s`` for it (see the module docstring for the answers)."""
    app = request.app
    settings: Settings = app.state.settings
    engine = app.state.engine
    job_id, answered = await run_in_threadpool(_submit, engine, principal, settings, app.state.store, op, body)
    deadline = time.monotonic() + settings.op_wait_s
    pause = POLL_FIRST_S
    while answered is None:
        state, job = await run_in_threadpool(_snapshot, engine, job_id)
        if state in TERMINAL or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, POLL_MAX_S)
    else:
        state, job = answered.state, answered
    out = await run_in_threadpool(op_out, engine, settings, job)
    if state == "succeeded":
        return out
    if state in ("failed", "cancelled"):
        code = status.HTTP_400_BAD_REQUEST if state == "failed" else status.HTTP_409_CONFLICT
        return JSONResponse({"detail": job.error or f"operation {state}", "job_id": job_id, "state": state},
                            status_code=code)
    response.status_code = status.HTTP_202_ACCEPTED
    response.headers["Location"] = f"/api/v1/ops/jobs/{job_id}"
    return out



# --------------------------------------------------------------------------------------------- routes
_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": OpOut, "description": "still running after op_wait_s: poll Location"},
    400: {"description": "the operation refused its input: {detail, job_id}"},
    404: {"description": "a file id that is not yours"},
    422: {"description": "invalid options, or a file of the wrong kind"},
    503: {"description": "the broker is unavailable"},
}


#: Each operation's request body and the description its endpoint shows in the OpenAPI schema.
OPERATIONS: dict[str, tuple[type[OpBody], str]] = {
    "inspect": (InspectBody, "Everything about an adapter file: algorithms, module counts per component, ranks and "
                "alphas, dtypes, base family with evidence, metadata (Lyco / ss_* / modelspec), payload sha256."),
    "check": (CheckBody, "Does an adapter fit a base model: modules that load, keys with no layer, shape mismatches, "
              "both families."),
    "bake": (BakeBody, "A new model (kind ``model``): the base with the adapters merged into its weights, in the "
             "base's layout."),
    "merge": (MergeBody, "One adapter whose effect is Σ wᵢ·ΔWᵢ: exact, or re-ranked by SVD with ``rank`` (errors "
              "reported)."),
    "rescale": (RescaleBody, "Fold a strength multiplier into the file, or store a new alpha keeping the weight "
                "change."),
    "resize": (ResizeBody, "Re-rank every module to a LoRA/LoCon by SVD (fixed rank or a dynamic rule); relative "
               "errors reported."),
    "convert": (ConvertBody, "Convert between ecosystems (kohya, PEFT, diffusers, ComfyUI), namings, algorithms and "
                "bases."),
    "extract": (ExtractBody, "A LoRA/LoCon approximating the difference of two models (base and tuned)."),
}


def _add_operation_route(op: str, body_type: type[OpBody], description: str) -> None:
    """``POST /ops/<op>``: :func:`run_op` with ``body_type`` as the validated request body."""

    async def endpoint(body: Any, request: Request, response: Response, principal: SubmitPrincipal) -> Any:
        return await run_op(request, response, principal, op, body)

    endpoint.__annotations__["body"] = body_type  # FastAPI validates (and documents) the body by this annotation
    endpoint.__name__ = endpoint.__qualname__ = f"op_{op}"  # the OpenAPI operationId, as clients know it
    endpoint.__doc__ = description
    router.post(f"/{op}", response_model=OpOut, responses=_RESPONSES)(endpoint)


for _op, (_body, _description) in OPERATIONS.items():
    _add_operation_route(_op, _body, _description)


@router.get("/jobs/{job_id}", response_model=OpOut, responses={404: {"description": "no such op job of yours"}})
def op_job(job_id: str, request: Request, principal: ReadPrincipal) -> OpOut:
    """An operation job's state, and its report and output file once it succeeded."""
    engine = request.app.state.engine
    with Session(bind=engine) as s:
        job = s.get(Job, job_id) if ID_RE.fullmatch(job_id) else None
        job = owned_or_404(job if job is not None and job.kind == "op" else None, principal, "op job")
        s.expunge(job)
    return op_out(engine, request.app.state.settings, job)
