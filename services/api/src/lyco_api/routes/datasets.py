"""Datasets: upload a zip of images (with captions and ``concept.toml`` files), stored as an extracted folder.

The zip is streamed to a temp file (413 past ``LYCO_MAX_UPLOAD_MB``), then extracted safely into a temp folder
(:func:`lyco_api.uploads.extract_dataset_zip`: no absolute or ``..`` paths, no links, at most
``LYCO_MAX_ZIP_ENTRIES`` entries and ``LYCO_MAX_ZIP_TOTAL_MB`` uncompressed, no image over
``LYCO_MAX_IMAGE_PIXELS``), read by the trainer's ``discover`` (concepts, images, buckets) and moved into the
store in one rename; the row is registered only then. Files that are not images are not kept and are listed in
the answer. List, download (a zip) and delete through ``/files`` (``kind=dataset``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from ..auth import SettingsDep, StoreDep, SubmitPrincipal
from ..db import Session, new_id
from ..settings import Settings
from ..uploads import (
    UploadError,
    ZipLimits,
    add_folder,
    dataset_summary,
    extract_dataset_zip,
    receive_upload,
    remove_path,
)
from .files import MULTIPART_BODY, UPLOAD_RESPONSES, FileOut, upload_error

router = APIRouter(prefix="/datasets", tags=["datasets"])


class NonImage(BaseModel):
    """A zip entry that was not kept, and why."""

    name: str
    reason: str


class DatasetOut(BaseModel):
    """The stored dataset, what the zip held, and the trainer's view of it."""

    file: FileOut
    entries: int = Field(description="entries in the zip's directory")
    images: int = Field(description="images kept")
    side_files: list[str] = Field(description="caption and concept.toml files kept")
    non_images: list[NonImage] = Field(description="entries not kept (not images, unreadable images, OS metadata)")
    total_bytes: int = Field(description="bytes extracted")
    summary: dict[str, Any] = Field(description="lyco_trainer.data.discover: concepts, images, buckets, warnings")


def limits_of(settings: Settings) -> ZipLimits:
    """The zip limits of the settings (MiB → bytes)."""
    return ZipLimits(max_entries=settings.max_zip_entries, max_total_bytes=settings.max_zip_total_mb << 20,
                     max_image_pixels=settings.max_image_pixels)


def _ingest(engine: Any, store: Any, settings: Settings, user_id: int, zip_path: Path, name: str) -> DatasetOut:
    folder = store.tmp_dir / f"dataset-{new_id()}"
    try:
        report = extract_dataset_zip(zip_path, folder, limits_of(settings), name)
        summary = dataset_summary(folder)
        info = report.as_dict()
        stem = name[:-4] if name.lower().endswith(".zip") else name
        meta = {"images": len(report.images), "non_images": info["non_images"][:200], "summary": summary,
                "source": name}
        with Session(bind=engine) as s:
            row = add_folder(store, s, user_id, "dataset", folder, stem or "dataset", meta)
            s.commit()
            out = FileOut.of(row)
    finally:
        remove_path(folder)
    return DatasetOut(file=out, entries=info["entries"], images=info["images"], side_files=info["side_files"],
                      non_images=[NonImage(**x) for x in info["non_images"]], total_bytes=info["total_bytes"],
                      summary=summary)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut, responses=UPLOAD_RESPONSES,
             openapi_extra=MULTIPART_BODY)
async def upload_dataset(request: Request, principal: SubmitPrincipal, settings: SettingsDep,
                         store: StoreDep) -> Any:
    """Upload a dataset as a zip (folders of images with same-name ``.txt`` captions; see the trainer's data
    layout). Refused with 400 and the reason: not a zip, unsafe paths, links, too many entries, too large once
    extracted, an oversized image, no readable image."""
    try:
        rec = await receive_upload(request.headers, request.stream(), store.tmp_dir, settings.max_upload_mb << 20)
    except UploadError as e:
        return upload_error(e)
    try:
        name = rec.fields.get("name") or rec.filename
        return await run_in_threadpool(_ingest, request.app.state.engine, store, settings, principal.user_id,
                                       rec.path, name)
    except UploadError as e:
        return upload_error(e)
    finally:
        remove_path(rec.path)
