"""Receiving and validating uploads: streamed multipart bodies with a size cap, adapter files, dataset zips.

Nothing here touches the database: the routes call these functions, then register what passed in the store.
Every rejection is an :class:`UploadError` with the HTTP status to answer and a one-line reason that names the
uploaded file (or zip entry), never a server path.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import stat
import uuid
import warnings
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from lyco_core.errors import LycoError

#: Room for multipart boundaries and part headers on top of the file itself (bytes).
BODY_OVERHEAD = 64 * 1024
#: The largest text field accepted next to the file part (bytes), and how many of them.
MAX_FIELD_BYTES = 16 * 1024
MAX_FIELDS = 16
CHUNK = 1024 * 1024

#: Files kept from a dataset zip besides images: captions and per-concept settings (see lyco_trainer.data).
DATASET_SIDE_FILES = (".txt", ".caption", ".toml")


class UploadError(Exception):
    """An upload the server refuses; ``status`` is the HTTP status to answer, the message its one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def one_line(text: str, limit: int = 400) -> str:
    """The first line of ``text``, shortened to ``limit`` characters."""
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------- multipart body
@dataclass
class ReceivedFile:
    """One file part of a multipart body, written to ``path`` (the caller deletes or moves it)."""

    path: Path
    filename: str
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)


def _safe_filename(raw: str, default: str) -> str:
    """The last path component of a client-sent filename, without control characters (≤ 200 chars)."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return (name or default)[:200]


async def receive_upload(
    headers: Any, stream: AsyncIterator[bytes], tmp_dir: Path, max_bytes: int, *, field_name: str = "file"
) -> ReceivedFile:
    """Parse a ``multipart/form-data`` body, streaming the part ``field_name`` into a new file under ``tmp_dir``.

    ``headers``: the request headers (a mapping with ``content-type`` / ``content-length``); ``stream``: the raw
    body chunks. ``max_bytes`` caps the file part (and the body, plus :data:`BODY_OVERHEAD`): a declared
    Content-Length over it is refused before anything is read, and the body stops being read as soon as it goes
    over (413). Other small text fields are returned in ``fields``. Raises :class:`UploadError` (400 malformed
    or missing part, 413 too large, 415 not multipart); no file is left behind on error.
    """
    ctype = headers.get("content-type") or ""
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(415, f"send the file as multipart/form-data with a {field_name!r} part")
    limit_mb = max_bytes / 2**20
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + BODY_OVERHEAD:
        raise UploadError(413, f"upload of {int(declared)} bytes is larger than the limit of {limit_mb:g} MiB")

    tmp_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"headers": {}, "hname": b"", "hval": b"", "part": None, "fields_n": 0}
    fields: dict[str, str] = {}
    target = tmp_dir / f"upload-{uuid.uuid4().hex}.part"
    out = open(target, "wb")  # noqa: SIM115 - closed in the finally below, written from parser callbacks
    digest = hashlib.sha256()
    got: dict[str, Any] = {"size": 0, "filename": None, "done": False}

    def on_part_begin() -> None:
        state["headers"] = {}
        state["part"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["hval"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["hname"].lower()] = state["hval"]
        state["hname"] = state["hval"] = b""

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            if name != field_name or got["filename"] is not None:
                raise UploadError(400, f"send exactly one file, in the {field_name!r} part (got a file in {name!r})")
            got["filename"] = _safe_filename(opts[b"filename"].decode("utf-8", "replace"), "upload")
            state["part"] = ("file", name)
        else:
            state["fields_n"] += 1
            if state["fields_n"] > MAX_FIELDS:
                raise UploadError(400, f"too many form fields (at most {MAX_FIELDS})")
            state["part"] = ("field", name)
            fields[name] = ""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        kind_, name = state["part"]
        chunk = data[start:end]
        if kind_ == "file":
            got["size"] += len(chunk)
            if got["size"] > max_bytes:
                raise UploadError(413, f"{got['filename']}: larger than the upload limit of {limit_mb:g} MiB")
            out.write(chunk)
            digest.update(chunk)
        else:
            value = fields[name] + chunk.decode("utf-8", "replace")
            if len(value) > MAX_FIELD_BYTES:
                raise UploadError(400, f"form field {name!r} is longer than {MAX_FIELD_BYTES} bytes")
            fields[name] = value

    def on_part_end() -> None:
        if state["part"] and state["part"][0] == "file":
            got["done"] = True

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    ok = False
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)
        body = 0
        async for chunk in stream:
            body += len(chunk)
            if body > max_bytes + BODY_OVERHEAD:
                raise UploadError(413, f"upload is larger than the limit of {limit_mb:g} MiB")
            parser.write(chunk)
        parser.finalize()
        if got["filename"] is None or not got["done"]:
            raise UploadError(400, f"the body has no complete file part named {field_name!r}")
        ok = True
    except FormParserError as e:
        raise UploadError(400, f"malformed multipart body ({one_line(str(e))})") from None
    finally:
        out.close()
        if not ok:
            target.unlink(missing_ok=True)
    return ReceivedFile(target, got["filename"], got["size"], digest.hexdigest(), fields)


# --------------------------------------------------------------------------------------------- adapters
#: Keys of ``lyco_core.ops.inspect.inspect_adapter`` kept as the stored file's metadata (the per-module table and
#: the raw header are left out: they can be thousands of entries; ``POST /ops/inspect`` gives everything).
INSPECT_SUMMARY_KEYS = (
    "module_count", "algorithms", "roles", "ranks", "rank_histogram", "alpha_histogram", "parameters",
    "tensor_count", "dtypes", "dtype_counts", "base_family", "payload_sha256", "hash_matches", "schema_version",
    "stored_schema_version",
)


def validate_adapter(path: Path, filename: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check that ``path`` is an adapter file Lyco reads; returns its inspect summary (the stored file's ``meta``)
    and the whole inspect report (what ``POST /ops/inspect`` answers), both JSON-able.

    Raises :class:`UploadError` (400) with lyco_core's one-line reason, the temp path replaced by ``filename``.
    """
    from lyco_core.ops.inspect import inspect_adapter

    try:
        info = inspect_adapter(path)
    except LycoError as e:
        raise UploadError(400, one_line(str(e).replace(str(path), filename))) from None
    except (OSError, ValueError, RuntimeError) as e:  # safetensors / torch errors on a broken payload
        raise UploadError(400, f"{filename}: not a readable adapter file ({one_line(str(e))})") from None
    if not info.get("module_count"):
        raise UploadError(400, f"{filename}: holds no adapter module (no tensor matches any adapter algorithm)")
    summary = {k: info[k] for k in INSPECT_SUMMARY_KEYS if k in info}
    unknown = list(info.get("unknown_tensors") or [])
    summary["unknown_tensor_count"] = len(unknown)
    summary["unknown_tensors"] = unknown[:20]
    lyco_meta = (info.get("metadata_split") or {}).get("lyco")
    if lyco_meta:
        summary["lyco_metadata"] = lyco_meta
    return summary, info


# --------------------------------------------------------------------------------------------- dataset zips
@dataclass
class ZipLimits:
    """Limits on a dataset zip: entries in its directory, bytes once extracted, pixels of one image."""

    max_entries: int
    max_total_bytes: int
    max_image_pixels: int


@dataclass
class ExtractReport:
    """What :func:`extract_dataset_zip` kept and what it left out (``skipped``: entry name → reason)."""

    entries: int = 0
    images: list[str] = field(default_factory=list)
    side_files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "images": len(self.images),
            "side_files": self.side_files,
            "non_images": [{"name": k, "reason": v} for k, v in self.skipped.items()],
            "total_bytes": self.total_bytes,
        }


def _entry_parts(name: str) -> list[str]:
    """The path components of a zip entry name; raises UploadError for absolute paths and ``..`` (zip-slip)."""
    if "\x00" in name:
        raise UploadError(400, f"zip entry {name!r}: NUL character in the name")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise UploadError(400, f"zip entry {name!r}: absolute paths are not allowed")
    parts = [p for p in PurePosixPath(unified).parts if p not in ("", ".")]
    if ".." in parts:
        raise UploadError(400, f"zip entry {name!r}: '..' in a path is not allowed (path traversal)")
    return parts


def _entry_type(info: zipfile.ZipInfo) -> str:
    """``file`` | ``dir`` | ``symlink`` | ``special`` from the entry's Unix mode (external_attr) and name."""
    mode = info.external_attr >> 16
    if info.is_dir():
        return "dir"
    if mode and stat.S_ISLNK(mode):
        return "symlink"
    if mode and stat.S_IFMT(mode) and not stat.S_ISREG(mode):
        return "special"
    return "file"


def _skip_reason(parts: list[str], image_exts: frozenset[str]) -> str | None:
    """Why an entry is not kept (None: keep it)."""
    if parts[0] == "__MACOSX" or parts[-1] in (".DS_Store", "Thumbs.db", "desktop.ini"):
        return "operating-system metadata"
    suffix = PurePosixPath(parts[-1]).suffix.lower()
    if suffix in image_exts or suffix in DATASET_SIDE_FILES:
        return None
    return f"not an image (extension {suffix or 'none'!r})"


def _check_image(path: Path, name: str, max_pixels: int) -> str | None:
    """Read only the image header: None if it is a usable image, else why not; UploadError above ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
        except Image.DecompressionBombError as e:
            raise UploadError(400, f"zip entry {name!r}: image too large, a possible decompression bomb "
                                   f"({one_line(str(e))})") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return f"not a readable image ({one_line(str(e).replace(str(path), name), 160)})"
    if w * h > max_pixels:
        raise UploadError(400, f"zip entry {name!r}: {w}×{h} = {w * h} pixels is over the limit of {max_pixels} "
                               "(a possible decompression bomb)")
    return None


def extract_dataset_zip(zip_path: Path, dest: Path, limits: ZipLimits, filename: str = "upload.zip") -> ExtractReport:
    """Extract the images (and captions / ``concept.toml``) of a dataset zip into the new folder ``dest``.

    Refused as a whole (:class:`UploadError` 400, ``dest`` removed): not a zip, an encrypted entry, more than
    ``limits.max_entries`` entries, an absolute or ``..`` path, a symlink or special-file entry, duplicate names,
    more than ``limits.max_total_bytes`` bytes uncompressed (as declared, and as actually written — a lying
    header cannot get past it), an image over ``limits.max_image_pixels`` pixels (header read only, no decode),
    or no readable image at all. Files that are not images (nor caption/concept files) are not extracted but
    listed in ``skipped`` with the reason, as are image-named files PIL cannot read.
    """
    from lyco_trainer.data import IMAGE_EXTENSIONS

    if not zipfile.is_zipfile(zip_path):
        raise UploadError(400, f"{filename}: not a zip file")
    dest.mkdir(parents=True)
    try:
        return _extract(zip_path, dest, limits, filename, frozenset(IMAGE_EXTENSIONS))
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(zip_path: Path, dest: Path, limits: ZipLimits, filename: str, image_exts: frozenset[str]) -> ExtractReport:
    report = ExtractReport()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UploadError(400, f"{filename}: not a readable zip file ({one_line(str(e))})") from None
    with zf:
        infos = zf.infolist()
        report.entries = len(infos)
        if len(infos) > limits.max_entries:
            raise UploadError(400, f"{filename}: {len(infos)} entries, more than the limit of {limits.max_entries}")
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_total_bytes:
            raise UploadError(400, f"{filename}: {declared} bytes uncompressed, more than the limit of "
                                   f"{limits.max_total_bytes}")
        plan: list[tuple[zipfile.ZipInfo, list[str]]] = []
        seen: set[str] = set()
        for info in infos:
            parts = _entry_parts(info.filename)
            kind = _entry_type(info)
            if kind == "symlink":
                raise UploadError(400, f"zip entry {info.filename!r}: symbolic links are not allowed")
            if kind == "special":
                raise UploadError(400, f"zip entry {info.filename!r}: not a regular file")
            if info.flag_bits & 0x1:
                raise UploadError(400, f"zip entry {info.filename!r}: encrypted entries are not supported")
            if kind == "dir" or not parts:
                continue
            key = "/".join(parts).lower()  # case-folded: the store may sit on a case-insensitive file system
            if key in seen:
                raise UploadError(400, f"zip entry {info.filename!r}: the name appears twice")
            seen.add(key)
            why = _skip_reason(parts, image_exts)
            if why is not None:
                report.skipped[info.filename] = why
                continue
            plan.append((info, parts))
        root = dest.resolve()
        for info, parts in plan:
            target = dest.joinpath(*parts)
            if not target.resolve().is_relative_to(root):  # unreachable after _entry_parts; kept as a backstop
                raise UploadError(400, f"zip entry {info.filename!r}: leaves the dataset folder")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(CHUNK):
                        report.total_bytes += len(chunk)
                        if report.total_bytes > limits.max_total_bytes:
                            raise UploadError(400, f"{filename}: more than {limits.max_total_bytes} bytes "
                                                   "uncompressed (the sizes in the zip directory are wrong)")
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as e:
                raise UploadError(400, f"zip entry {info.filename!r}: cannot be extracted ({one_line(str(e))})") \
                    from None
            name = "/".join(parts)
            if PurePosixPath(parts[-1]).suffix.lower() in image_exts:
                why = _check_image(target, info.filename, limits.max_image_pixels)
                if why is not None:
                    target.unlink()
                    report.skipped[info.filename] = why
                    continue
                report.images.append(name)
            else:
                report.side_files.append(name)
    if not report.images:
        raise UploadError(400, f"{filename}: no readable image in the zip ({len(report.skipped)} other file(s))")
    return report


def dataset_summary(folder: Path) -> dict[str, Any]:
    """``lyco_trainer.data.discover`` on an extracted dataset: concepts, image counts, buckets, skipped files.

    Paths in the report are made relative to ``folder`` (the store location is not the client's business).
    Raises :class:`UploadError` (400) when the trainer finds no usable image.
    """
    from lyco_trainer.config import DataConfig
    from lyco_trainer.data import discover

    try:
        report = discover(DataConfig(root=folder)).report
    except LycoError as e:
        raise UploadError(400, one_line(str(e).replace(str(folder), "<dataset>"))) from None
    data = report.model_dump(mode="json")
    prefix = str(folder)

    def rel(v: Any) -> Any:
        if isinstance(v, str) and v.startswith(prefix):
            return v[len(prefix):].lstrip("/") or "."
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        return v

    return rel(data)  # type: ignore[no-any-return]


def remove_path(p: Path) -> None:
    """Delete a file or folder if it exists (temp clean-up; never raises)."""
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- stored folders / models
# FileStore keeps single files; an extracted dataset is a folder, and registered base models stay where they are
# in ``settings.models_dir``. ``StoredFile.meta`` says which: ``layout: "folder"`` (a folder in the store; its
# path relative to data_dir is also in ``meta["dir"]``, which the jobs routes read) or ``location: "models_dir"``
# (``path`` relative to models_dir; the absolute path also in ``meta["path"]``).
FOLDER = "folder"
MODELS_DIR = "models_dir"


def tree_digest(root: Path) -> tuple[int, str]:
    """(total bytes, sha256) of a file or a folder; a folder's digest is the sha256 of its sorted
    ``<relative path>\\0<size>\\0<sha256 of the file>\\n`` lines, so it changes with any name or content."""
    if root.is_file():
        h = hashlib.sha256()
        with root.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return root.stat().st_size, h.hexdigest()
    total = 0
    tree = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        size, digest = tree_digest(p)
        total += size
        tree.update(f"{p.relative_to(root).as_posix()}\0{size}\0{digest}\n".encode())
    return total, tree.hexdigest()


def add_folder(store: Any, s: Any, user_id: int, kind: str, folder: Path, name: str,
               meta: dict[str, Any] | None = None) -> Any:
    """Move ``folder`` (under ``store.tmp_dir``) into the store and register it; returns the StoredFile.

    The folder is renamed into place in one step and the row is added (flushed) only after that, so a row never
    points at a partial folder.
    """
    from lyco_api.db import StoredFile, new_id, utcnow
    from lyco_api.store import safe_name

    size, digest = tree_digest(folder)
    fid = new_id()
    rel = Path("files") / fid[:2] / fid / safe_name(name)
    final = store.root / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.rename(final)
    except OSError:
        shutil.copytree(folder, final)
        shutil.rmtree(folder, ignore_errors=True)
    row = StoredFile(id=fid, user_id=user_id, kind=kind, name=name[:255], path=rel.as_posix(), size=size,
                     sha256=digest, created_at=utcnow(),
                     meta={**(meta or {}), "layout": FOLDER, "dir": rel.as_posix()})
    s.add(row)
    try:
        s.flush()
    except BaseException:
        s.expunge(row)
        shutil.rmtree(final.parent, ignore_errors=True)
        raise
    return row


def stored_path(store: Any, models_dir: Path, f: Any) -> Path:
    """Where a StoredFile is on disk: a store file, a store folder, or a base model in ``models_dir``.

    Raises NotFoundError when it is gone, CorruptFileError when a row points outside its root.
    """
    from lyco_core.errors import CorruptFileError, NotFoundError

    meta = f.meta or {}
    if meta.get("location") == MODELS_DIR:
        root = models_dir.resolve()
        p = (root / f.path).resolve()
        if not p.is_relative_to(root):
            raise CorruptFileError(f"model {f.id}: path {f.path!r} is outside the models directory")
        if not p.exists():
            raise NotFoundError(f"model {f.id} ({f.name}) is missing from the models directory")
        return p
    if meta.get("layout") == FOLDER:
        p = (store.root / f.path).resolve()
        if not p.is_relative_to(store.files_dir):
            raise CorruptFileError(f"file {f.id}: stored path {f.path!r} is outside the store")
        if not p.is_dir():
            raise NotFoundError(f"file {f.id} ({f.name}) is missing from the store")
        return p
    return store.path(f)  # type: ignore[no-any-return]


def delete_stored(store: Any, s: Any, f: Any) -> None:
    """Unregister ``f``; remove its file or folder from the store (a registered base model is never deleted)."""
    meta = f.meta or {}
    if meta.get("location") == MODELS_DIR:
        s.delete(f)
        s.flush()
        return
    if meta.get("layout") == FOLDER:
        p = (store.root / f.path).resolve()
        s.delete(f)
        s.flush()
        if p.is_relative_to(store.files_dir):
            shutil.rmtree(p.parent, ignore_errors=True)
        return
    store.delete(s, f)
