"""Base models: register a model that sits in the server's model folder (``LYCO_MODELS_DIR``), list, get, delete.

A registration names a path inside the model folder (a diffusers folder, a diffusers-named ``.safetensors`` state
dict or an LDM single file); the path must stay inside the folder once links are resolved, and the model must open
with :func:`lyco_core.checkpoint.open_base`, whose detected family and evidence are recorded. Nothing is copied:
the row (``kind="model"``) points at the model in place, and deleting it only unregisters it. Models belong to the
user who registered them, like files; registering the same path again answers the existing row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from lyco_core.errors import LycoError

from ..auth import ReadPrincipal, SessionDep, StoreDep, SubmitPrincipal, visible
from ..db import Session, StoredFile, new_id, utcnow
from ..settings import Settings
from ..store import resolve_under
from ..uploads import MODELS_DIR, delete_stored, one_line, tree_digest
from .files import FileList, FileOut, get_file

router = APIRouter(prefix="/models", tags=["models"])


class ModelIn(BaseModel):
    """A model to register: its path relative to the server's model folder."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1000, description="path inside LYCO_MODELS_DIR (file or folder)")
    name: str | None = Field(None, min_length=1, max_length=255, description="display name (default: the path)")


def _unprocessable(msg: str) -> HTTPException:
    return HTTPException(422, msg)


def resolve_model_path(settings: Settings, raw: str) -> tuple[Path, str]:
    """(absolute path, path relative to models_dir) of a registration; 422 outside the folder or missing."""
    root = Path(settings.models_dir).resolve()
    p = resolve_under(root, raw)
    if p is None:
        raise _unprocessable(f"path: {raw!r} is not a path inside the server's models folder")
    if p == root:
        raise _unprocessable("path: name a model inside the models folder, not the folder itself")
    if not p.exists():
        raise _unprocessable(f"path: {raw!r}: no such file or folder in the models folder")
    return p, p.relative_to(root).as_posix()


def _open(path: Path, rel: str) -> dict[str, Any]:
    """Open the model with lyco_core; the facts recorded in ``meta`` (400 with the reason if it does not open)."""
    from lyco_core.checkpoint import open_base

    try:
        with open_base(path) as base:
            info = {"family": base.family, "evidence": list(base.evidence), "format": base.kind,
                    "layers": len(base.keys())}
    except LycoError as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, one_line(str(e).replace(str(path), rel))) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{rel}: not a model Lyco reads ({one_line(str(e))})") \
            from None
    size, digest = tree_digest(path)
    return {**info, "size": size, "sha256": digest}


def _register(engine: Any, settings: Settings, user_id: int, body: ModelIn) -> tuple[FileOut, bool]:
    path, rel = resolve_model_path(settings, body.path)
    with Session(bind=engine) as s:
        mine = s.scalars(select(StoredFile).where(StoredFile.user_id == user_id, StoredFile.kind == "model",
                                                  StoredFile.path == rel)).all()
        for f in mine:
            if (f.meta or {}).get("location") == MODELS_DIR:
                return FileOut.of(f), False
    info = _open(path, rel)
    meta = {"location": MODELS_DIR, "path": str(path), "is_dir": path.is_dir(), "relative_path": rel,
            "family": info["family"], "evidence": info["evidence"], "format": info["format"],
            "layers": info["layers"]}
    with Session(bind=engine) as s:
        row = StoredFile(id=new_id(), user_id=user_id, kind="model", name=body.name or rel, path=rel,
                         size=info["size"], sha256=info["sha256"], created_at=utcnow(), meta=meta)
        s.add(row)
        s.commit()
        return FileOut.of(row), True


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FileOut, responses={
    200: {"model": FileOut, "description": "this path was registered by you already"},
    400: {"description": "the path does not open as a base model (detail: the reason)"},
    422: {"description": "a path outside the models folder, or missing"}})
async def register_model(body: ModelIn, request: Request, response: Response, principal: SubmitPrincipal) -> FileOut:
    """Register a base model that sits in the server's models folder; ``meta`` holds its family (sd1/sd2/sdxl),
    the evidence, its format (diffusers-folder, state-dict, ldm) and its number of adaptable layers."""
    out, created = await run_in_threadpool(_register, request.app.state.engine, request.app.state.settings,
                                           principal.user_id, body)
    if not created:
        response.status_code = status.HTTP_200_OK
    return out


@router.get("", response_model=FileList)
def list_models(principal: ReadPrincipal, s: SessionDep,
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> FileList:
    """The caller's models (registered, and baked by ``/ops/bake``), newest first."""
    stmt = visible(select(StoredFile), StoredFile, principal).where(StoredFile.kind == "model")
    count = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = s.scalars(stmt.order_by(StoredFile.created_at.desc(), StoredFile.id).limit(limit).offset(offset)).all()
    return FileList(items=[FileOut.of(f) for f in rows], count=int(count))


@router.get("/{model_id}", response_model=FileOut, responses={404: {"description": "no such model of yours"}})
def get_model(model_id: str, principal: ReadPrincipal, s: SessionDep) -> FileOut:
    """A model's record."""
    return FileOut.of(get_file(s, model_id, principal, kind="model"))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "no such model of yours"}})
def delete_model(model_id: str, principal: SubmitPrincipal, s: SessionDep, store: StoreDep) -> Response:
    """Unregister a model (a model in the models folder stays on disk; a baked model is deleted from the store)."""
    delete_stored(store, s, get_file(s, model_id, principal, kind="model"))
    s.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
