"""Files: upload an adapter, list, get, download (ETag = sha256), delete.

Every file belongs to the user of the key that made it; another user's file answers 404 (admins see all). Uploads
are ``multipart/form-data`` with one ``file`` part, streamed to a temp file in the store and refused with 413 as
soon as they pass ``LYCO_MAX_UPLOAD_MB``. An adapter is read with ``lyco_core`` before it is stored: a file Lyco
cannot read is refused with 400 and its one-line reason, and nothing is stored. Folders in the store (datasets) are
downloaded as a zip built on the fly.
"""

from __future__ import annotations

import re
import tempfile
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.background import BackgroundTask

from .. import opcache
from ..auth import Principal, ReadPrincipal, SessionDep, SettingsDep, StoreDep, SubmitPrincipal, owned_or_404, visible
from ..db import FILE_KINDS, Session, StoredFile
from ..uploads import (
    FOLDER,
    MODELS_DIR,
    UploadError,
    delete_stored,
    receive_upload,
    remove_path,
    stored_path,
    validate_adapter,
)

router = APIRouter(prefix="/files", tags=["files"])

FileKind = Literal["adapter", "dataset", "image", "report", "model", "other"]
assert set(FileKind.__args__) == set(FILE_KINDS)  # type: ignore[attr-defined]

#: OpenAPI description of the multipart body of an upload (the body is parsed by hand, streamed with a limit).
MULTIPART_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the file"},
                        "name": {"type": "string", "description": "name to store it under (default: its file name)"},
                    },
                }
            }
        },
    }
}

UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "not a valid file (detail: the one-line reason) or a malformed body"},
    413: {"description": "larger than LYCO_MAX_UPLOAD_MB"},
    415: {"description": "not multipart/form-data"},
}


class FileOut(BaseModel):
    """A stored file (or folder): ``size`` in bytes, ``sha256`` of the content (of the file list for a folder)."""

    id: str
    kind: str
    name: str
    size: int
    sha256: str
    created_at: datetime
    user_id: int
    folder: bool = Field(False, description="a folder (downloaded as a zip)")
    meta: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, f: StoredFile) -> FileOut:
        meta = dict(f.meta or {})
        folder = meta.get("layout") == FOLDER or (meta.get("location") == MODELS_DIR and meta.get("is_dir") is True)
        hidden = {"layout", "dir", "path", "location", "is_dir"}
        return cls(id=f.id, kind=f.kind, name=f.name, size=f.size, sha256=f.sha256, created_at=f.created_at,
                   user_id=f.user_id, folder=bool(folder), meta={k: v for k, v in meta.items() if k not in hidden})


class FileList(BaseModel):
    """One page of files and how many match in all."""

    items: list[FileOut]
    count: int


def upload_error(e: UploadError) -> JSONResponse:
    """The HTTP answer of a refused upload."""
    return JSONResponse({"detail": e.message}, status_code=e.status)


#: What a file id can look like (uuid4 strings); anything else is not looked up (PostgreSQL refuses NUL bytes).
ID_RE = re.compile(r"^[0-9A-Za-z-]{1,64}$")


def get_file(s: Any, file_id: str, principal: Principal, kind: str | None = None) -> StoredFile:
    """The caller's file ``file_id`` (of ``kind`` if given); 404 otherwise."""
    f = s.get(StoredFile, file_id) if ID_RE.fullmatch(file_id) else None
    if f is not None and kind is not None and f.kind != kind:
        f = None
    return owned_or_404(f, principal, "file")


def _register_adapter(engine: Any, store: Any, user_id: int, tmp: Path, name: str, meta: dict[str, Any],
                      report: dict[str, Any]) -> FileOut:
    with Session(bind=engine) as s:
        row = store.add(s, user_id, "adapter", tmp, name, meta, move=True)
        # the upload's validation was an inspect: keep its report, so POST /ops/inspect on this file needs no job
        key = opcache.result_key("inspect", {"adapter": row.sha256}, {})
        if key is not None:
            opcache.remember(s, key, "inspect", report)
        s.commit()
        return FileOut.of(row)


@router.post("/adapters", status_code=status.HTTP_201_CREATED, response_model=FileOut, responses=UPLOAD_RESPONSES,
             openapi_extra=MULTIPART_BODY)
async def upload_adapter(request: Request, principal: SubmitPrincipal, settings: SettingsDep,
                         store: StoreDep) -> Any:
    """Upload an adapter file (``.safetensors``, kohya/LyCORIS keys). It is read and validated first; its
    ``meta`` is the inspect summary (algorithms, module counts, ranks, base family, payload hash)."""
    try:
        rec = await receive_upload(request.headers, request.stream(), store.tmp_dir, settings.max_upload_mb << 20)
    except UploadError as e:
        return upload_error(e)
    try:
        name = rec.fields.get("name") or rec.filename
        meta, report = await run_in_threadpool(validate_adapter, rec.path, name)
        return await run_in_threadpool(_register_adapter, request.app.state.engine, store, principal.user_id,
                                       rec.path, name, meta, report)
    except UploadError as e:
        return upload_error(e)
    finally:
        remove_path(rec.path)


@router.get("", response_model=FileList)
def list_files(principal: ReadPrincipal, s: SessionDep,
               kind: Annotated[FileKind | None, Query(description="only files of this kind")] = None,
               limit: Annotated[int, Query(ge=1, le=500)] = 50,
               offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> FileList:
    """The caller's files (an admin's: everyone's), newest first."""
    stmt = visible(select(StoredFile), StoredFile, principal)
    if kind is not None:
        stmt = stmt.where(StoredFile.kind == kind)
    count = s.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = s.scalars(stmt.order_by(StoredFile.created_at.desc(), StoredFile.id).limit(limit).offset(offset)).all()
    return FileList(items=[FileOut.of(f) for f in rows], count=int(count))


@router.get("/{file_id}", response_model=FileOut, responses={404: {"description": "no such file of yours"}})
def get_file_meta(file_id: str, principal: ReadPrincipal, s: SessionDep) -> FileOut:
    """A file's metadata."""
    return FileOut.of(get_file(s, file_id, principal))


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header matches ``etag`` (weak comparison, lists and ``*`` understood)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _zip_folder(folder: Path, tmp_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(suffix=".zip", dir=tmp_dir)
    with open(fd, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                zf.write(p, p.relative_to(folder).as_posix())
    return Path(name)


@router.get("/{file_id}/download", responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the file (a folder: a zip of it)"},
    304: {"description": "If-None-Match matched the ETag (the sha256)"},
    404: {"description": "no such file of yours"}})
async def download_file(file_id: str, principal: ReadPrincipal, settings: SettingsDep, store: StoreDep,
                        request: Request,
                        if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The file's bytes. ``ETag`` is its sha256 in quotes; a matching ``If-None-Match`` answers 304."""

    def lookup() -> tuple[StoredFile, Path]:
        with Session(bind=request.app.state.engine) as s:
            f = get_file(s, file_id, principal)
            s.expunge(f)
        return f, stored_path(store, settings.models_dir, f)

    f, path = await run_in_threadpool(lookup)
    etag = f'"{f.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    if path.is_dir():
        archive = await run_in_threadpool(_zip_folder, path, store.tmp_dir)
        return FileResponse(archive, media_type="application/zip", filename=f"{f.name}.zip", headers=headers,
                            background=BackgroundTask(remove_path, archive))
    return FileResponse(path, media_type="application/octet-stream", filename=f.name, headers=headers)


@router.delete("/{file_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "no such file of yours"}})
def delete_file(file_id: str, principal: SubmitPrincipal, s: SessionDep, store: StoreDep) -> Response:
    """Delete a file from the store (a registered base model is only unregistered; its files stay)."""
    f = get_file(s, file_id, principal)
    delete_stored(store, s, f)
    s.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


__all__ = ["FileList", "FileOut", "etag_matches", "get_file", "router"]
