"""The file store: files under ``<data_dir>/files/<id[:2]>/<id>/<name>``, registered in the ``files`` table.

A file is first written to ``<data_dir>/tmp/`` (hashing and counting as it goes), fsynced, then renamed into place
and only then registered, so a row never points at a partial file and a crash leaves at most a temp file
(removed by :meth:`FileStore.sweep`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session as OrmSession

from lyco_core.errors import CorruptFileError, InvalidConfigError, LycoError, NotFoundError

from .db import FILE_KINDS, StoredFile, new_id, utcnow

CHUNK = 1 << 20


class TooLargeError(LycoError):
    """An upload or file is larger than the configured limit (the API answers 413)."""


def safe_name(name: str) -> str:
    """A file name safe to put on disk: the last path component, odd characters replaced, at most 200 chars."""
    base = re.split(r"[\\/]", name)[-1].strip()
    base = re.sub(r"[^A-Za-z0-9._+-]", "_", base).lstrip(".")
    if not base:
        base = "file"
    if len(base) > 200:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) < 20 else base[:200]
    return base


class FileStore:
    """Files of users under ``data_dir`` (see the module docstring for the layout)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir).expanduser().resolve()
        self.files_dir = self.root / "files"
        self.tmp_dir = self.root / "tmp"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def staging_path(self, suffix: str = "") -> Path:
        """A fresh temp path on the store's file system (write there, then :meth:`add` it with ``move=True``)."""
        return self.tmp_dir / f"{new_id()}{suffix}.part"

    def add(self, s: OrmSession, user_id: int, kind: str, source: Path | bytes | BinaryIO, name: str,
            meta: dict[str, Any] | None = None, *, max_bytes: int | None = None, move: bool = False) -> StoredFile:
        """Copy ``source`` (a path, bytes, or a binary stream read to its end) into the store and register it.

        The row is added (flushed, not committed) only after the file is complete under its final name.
        ``max_bytes`` raises :class:`TooLargeError` (nothing is kept); ``move=True`` renames a source path on the
        same file system instead of copying it. Returns the new :class:`StoredFile`.
        """
        if kind not in FILE_KINDS:
            raise InvalidConfigError(f"file kind {kind!r} is not one of {', '.join(FILE_KINDS)}")
        fid = new_id()
        fname = safe_name(name)
        rel = Path("files") / fid[:2] / fid / fname
        final = self.root / rel
        tmp = self.tmp_dir / f"{fid}.part"
        h = hashlib.sha256()
        size = 0
        try:
            if isinstance(source, Path) and move:
                size = source.stat().st_size
                if max_bytes is not None and size > max_bytes:
                    raise TooLargeError(f"{name}: {size} bytes is over the limit of {max_bytes} bytes")
                with source.open("rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                try:
                    os.replace(source, tmp)
                except OSError:  # another file system: copy instead
                    shutil.copyfile(source, tmp)
                    source.unlink()
            else:
                with tmp.open("wb") as out:
                    if isinstance(source, bytes | bytearray | memoryview):
                        data = bytes(source)
                        size = len(data)
                        if max_bytes is not None and size > max_bytes:
                            raise TooLargeError(f"{name}: {size} bytes is over the limit of {max_bytes} bytes")
                        h.update(data)
                        out.write(data)
                    else:
                        ctx = source.open("rb") if isinstance(source, Path) else contextlib.nullcontext(source)
                        with ctx as f:
                            while chunk := f.read(CHUNK):
                                size += len(chunk)
                                if max_bytes is not None and size > max_bytes:
                                    raise TooLargeError(f"{name}: over the limit of {max_bytes} bytes")
                                h.update(chunk)
                                out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if final.exists():
                final.unlink()
            _rmdir_quiet(final.parent)
            raise
        row = StoredFile(id=fid, user_id=user_id, kind=kind, name=name[:255] or fname, path=rel.as_posix(),
                         size=size, sha256=h.hexdigest(), created_at=utcnow(), meta=dict(meta or {}))
        s.add(row)
        try:
            s.flush()
        except BaseException:
            if row in s:
                s.expunge(row)
            final.unlink(missing_ok=True)
            _rmdir_quiet(final.parent)
            raise
        return row

    def path(self, f: StoredFile) -> Path:
        """Absolute path of a stored file; :class:`NotFoundError` if missing on disk, :class:`CorruptFileError`
        if the row points outside the store."""
        p = (self.root / f.path).resolve()
        if not p.is_relative_to(self.files_dir):
            raise CorruptFileError(f"file {f.id}: stored path {f.path!r} is outside the store")
        if not p.is_file():
            raise NotFoundError(f"file {f.id} ({f.name}) is missing from the store")
        return p

    def verify(self, f: StoredFile) -> bool:
        """Whether the file on disk still has the registered size and sha256."""
        p = self.path(f)
        if p.stat().st_size != f.size:
            return False
        h = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        return h.hexdigest() == f.sha256

    def delete(self, s: OrmSession, f: StoredFile) -> None:
        """Unregister ``f`` (flushed) and remove its file. A missing file on disk is not an error."""
        p = (self.root / f.path).resolve()
        s.delete(f)
        s.flush()
        if p.is_relative_to(self.files_dir):
            p.unlink(missing_ok=True)
            _rmdir_quiet(p.parent)
            _rmdir_quiet(p.parent.parent)

    def sweep(self, s: OrmSession, older_than_s: float = 3600.0) -> list[Path]:
        """Remove temp files and unregistered store files older than ``older_than_s``; returns what was removed."""
        cutoff = time.time() - older_than_s
        removed: list[Path] = []
        for p in self.tmp_dir.iterdir():
            if p.is_file() and p.stat().st_mtime < cutoff:
                p.unlink(missing_ok=True)
                removed.append(p)
        known = set(s.scalars(select(StoredFile.path)))
        for p in self.files_dir.glob("*/*/*"):
            if p.is_file() and p.stat().st_mtime < cutoff and p.relative_to(self.root).as_posix() not in known:
                p.unlink(missing_ok=True)
                _rmdir_quiet(p.parent)
                removed.append(p)
        return removed


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _rmdir_quiet(d: Path) -> None:
    with contextlib.suppress(OSError):
        d.rmdir()


def resolve_under(root: Path, raw: str) -> Path | None:
    """``raw`` (absolute, ``~``, or relative to ``root``) as a resolved path, or None when it is not a path under
    ``root``: outside it after links are resolved, or not a path at all (a NUL character)."""
    if "\x00" in raw:
        return None
    base = Path(root).resolve()
    p = Path(raw).expanduser()
    p = (p if p.is_absolute() else base / p).resolve()
    return p if p.is_relative_to(base) else None
