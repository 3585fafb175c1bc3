"""Safetensors files: validated reading, lazy loading, payload hashing and atomic writing.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian ``N``, then ``N`` bytes of
UTF-8 JSON (``{name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}``), then the data section.
Offsets are relative to the data section; the tensors must tile it exactly (no gap, no overlap, no trailing
bytes), which is what the safetensors loader itself requires.

:func:`read_header` checks all of that from the header bytes alone and raises
:class:`~lyco_core.errors.CorruptFileError` with a one-line message naming the file (and key), so nothing
reaches ``safe_open`` that it would reject with a less helpful error. Tensors are then read through
``safe_open`` (memory-mapped, one tensor at a time) and floating tensors are checked for NaN/Inf.

Writers go through :func:`atomic_output`: a hidden temporary file in the destination directory, fsync, then
``os.replace``; a failure at any point removes the temporary file and leaves any previous file untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import secrets
import shutil
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save
from safetensors.torch import save_file as _st_save_file

from ..buffers import BufferPool
from ..errors import CorruptFileError, FileExistsLycoError, InvalidConfigError, NotFoundError, UnknownFormatError
from .direct_io import SequentialWriter

PathLike = str | os.PathLike[str]

#: The safetensors loader refuses headers longer than this (its ``MAX_HEADER_SIZE``, about 95 MiB); checking
#: the same bound here means a header we accept is one ``safe_open`` accepts.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype the safetensors format defines (the loader's own list).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

#: Valid safetensors dtypes that torch cannot represent (read_header accepts them, loading refuses them).
_NO_TORCH_DTYPE = frozenset({"F6_E2M3", "F6_E3M2"})

_CHUNK = 1 << 20


def _show(path: PathLike) -> str:
    """The path as it appears in messages, with control characters escaped so messages stay one line."""
    return str(path).encode("unicode_escape").decode("ascii") if not str(path).isprintable() else str(path)


class TensorEntry(NamedTuple):
    """One tensor's header entry: safetensors dtype name, shape, and (start, end) within the data section."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file.

    ``tensors`` keeps the header's order; ``data_offset`` = 8 + header length is where the data section
    starts; ``file_size`` is the file's size in bytes when the header was read.
    """

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_offset: int
    file_size: int

    @property
    def header_length(self) -> int:
        return self.data_offset - 8

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_offset


# --------------------------------------------------------------------------------------------- reading
def _open_for_read(path: PathLike) -> tuple[Any, int]:
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise NotFoundError(f"{_show(path)}: not a regular file")
        return p.open("rb"), size
    except FileNotFoundError:
        raise NotFoundError(f"{_show(path)}: no such file") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(name: str, raw: object, where: str) -> TensorEntry:
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{where}: tensor {name!r}: entry is not a JSON object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in raw:
            raise CorruptFileError(f"{where}: tensor {name!r}: entry has no {field!r}")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CorruptFileError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise CorruptFileError(f"{where}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise CorruptFileError(f"{where}: tensor {name!r}: data_offsets {offsets!r} is not [start, end]")
    entry = TensorEntry(dtype, tuple(shape), (offsets[0], offsets[1]))
    bits = entry.numel * DTYPE_BITS[dtype]
    if entry.offsets[1] < entry.offsets[0] or bits % 8 or entry.nbytes != bits // 8:
        raise CorruptFileError(
            f"{where}: tensor {name!r}: data_offsets {list(entry.offsets)} span {entry.nbytes} bytes, "
            f"but {dtype} × {list(shape)} needs {bits / 8:g}"
        )
    return entry


def _check_layout(tensors: dict[str, TensorEntry], data_size: int, where: str) -> None:
    """The entries must tile the data section [0, data_size) exactly, as safe_open requires."""
    pos = 0
    prev = ""
    for name, e in sorted(tensors.items(), key=lambda kv: (kv[1].offsets, kv[0])):
        start, end = e.offsets
        if end > data_size:
            raise CorruptFileError(
                f"{where}: tensor {name!r}: data_offsets {list(e.offsets)} lie beyond the data section "
                f"({data_size} bytes); the file is truncated"
            )
        if start < pos:
            raise CorruptFileError(f"{where}: tensor {name!r}: data_offsets {list(e.offsets)} overlap tensor {prev!r}")
        if start > pos:
            raise CorruptFileError(f"{where}: tensor {name!r}: gap of {start - pos} bytes before its data")
        pos, prev = end, name
    if pos != data_size:
        raise CorruptFileError(f"{where}: {data_size - pos} bytes after the last tensor belong to no tensor")


def read_header(path: PathLike) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, without touching the data section.

    Raises :class:`NotFoundError` for a missing file and :class:`CorruptFileError` (one line, naming the
    file and, where relevant, the tensor) for a short file, an oversized or truncated header, a header that
    is not a UTF-8 JSON object, ``__metadata__`` that is not str→str, entries without dtype/shape/offsets,
    unknown dtypes, offsets that do not match dtype size × element count, and offsets that leave the data
    section, overlap, leave gaps or leave trailing bytes.
    """
    where = _show(path)
    fh, size = _open_for_read(path)
    with fh:
        if size < 8:
            raise CorruptFileError(
                f"{where}: not a safetensors file ({size} bytes; the 8-byte header length is missing)"
            )
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES:
            raise CorruptFileError(f"{where}: header too large ({n} bytes; the limit is {MAX_HEADER_BYTES})")
        if 8 + n > size:
            raise CorruptFileError(f"{where}: header too large ({n} bytes) for a file of {size} bytes; truncated?")
        raw = fh.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptFileError(f"{where}: header is not UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{where}: header is a JSON {type(doc).__name__}, not an object")

    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: __metadata__ is a JSON {type(meta).__name__}, not an object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise CorruptFileError(f"{where}: __metadata__[{k!r}] is a {type(v).__name__}, not a string")

    tensors = {name: _parse_entry(name, entry, where) for name, entry in doc.items()}
    _check_layout(tensors, size - 8 - n, where)
    return SafetensorsHeader(tensors=tensors, metadata=dict(meta), data_offset=8 + n, file_size=size)


def _check_finite(t: torch.Tensor, key: str, where: str) -> None:
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or t.is_complex():
        u = t
    else:  # float8 variants: check in float32; packed float4 has no NaN/Inf encodings and no conversion
        try:
            u = t.float()
        except (NotImplementedError, RuntimeError):
            return
    if bool(torch.isfinite(u.abs().amax())):  # NaN and Inf both propagate through the max: one cheap pass
        return
    ok = torch.isfinite(u)
    if not bool(ok.all()):
        n_nan = int(torch.isnan(u).sum())
        n_inf = int((~ok).sum()) - n_nan
        raise CorruptFileError(
            f"{where}: tensor {key!r} holds non-finite values ({n_nan} NaN, {n_inf} Inf of {t.numel()})"
        )


def _get_tensor(handle: Any, key: str, entry: TensorEntry, where: str, check_finite: bool) -> torch.Tensor:
    if entry.dtype in _NO_TORCH_DTYPE:
        raise UnknownFormatError(f"{where}: tensor {key!r}: dtype {entry.dtype} has no torch equivalent")
    try:
        t = handle.get_tensor(key)
    except KeyError as e:  # safetensors.torch has no torch dtype for this safetensors dtype
        raise UnknownFormatError(
            f"{where}: tensor {key!r}: dtype {entry.dtype} cannot be loaded by torch ({e})"
        ) from None
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CorruptFileError(f"{where}: tensor {key!r}: cannot be read ({' '.join(str(e).split())})") from None
    if check_finite:
        _check_finite(t, key, where)
    return t


def _safe_open(path: PathLike, device: str | torch.device) -> Any:
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(f"{_show(path)}: cannot be opened ({' '.join(str(e).split())})") from None


def load_tensors(
    path: PathLike,
    keys: list[str] | tuple[str, ...] | None = None,
    *,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Load tensors (all, or ``keys`` in that order) from a validated safetensors file onto ``device``.

    The file is memory-mapped and read one tensor at a time. A floating tensor holding NaN/Inf raises
    :class:`CorruptFileError` naming the file and key (unless ``check_finite`` is False); a key the file
    lacks raises :class:`NotFoundError`.
    """
    header = read_header(path)
    where = _show(path)
    names = list(header.tensors) if keys is None else list(keys)
    for k in names:
        if k not in header.tensors:
            raise NotFoundError(f"{where}: no tensor {k!r}")
    out: dict[str, torch.Tensor] = {}
    with _safe_open(path, device) as handle:
        for k in names:
            out[k] = _get_tensor(handle, k, header.tensors[k], where, check_finite)
    return out


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping name → tensor over a safetensors file that loads each tensor when it is asked for.

    The header is read and validated once (``.header``, ``.metadata``); tensors are not cached, so iterating
    over a file of any size holds one tensor at a time. The memory map stays open until :meth:`close` (or
    the end of a ``with`` block).
    """

    def __init__(self, path: PathLike, *, device: str | torch.device = "cpu", check_finite: bool = True) -> None:
        self.path = Path(path)
        self.header = read_header(path)
        self.device = device
        self.check_finite = check_finite
        self._handle: Any = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.header.tensors.get(key)
        if entry is None:
            raise KeyError(key)
        if self._handle is None:
            self._handle = _safe_open(self.path, self.device)
        return _get_tensor(self._handle, key, entry, _show(self.path), self.check_finite)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.header.tensors

    def close(self) -> None:
        """Release the memory map (tensors already returned stay valid: they are copies)."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None

    def __enter__(self) -> LazyTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- hashing
def payload_sha256(path: PathLike) -> str:
    """sha256 (lowercase hex) of a safetensors file's data section: the bytes after 8 + N.

    This is sd-scripts' ``sshs_model_hash``, A1111's addnet hash for ``.safetensors`` and civitai's AutoV3.
    It does not depend on the metadata. The file is validated first and streamed in 1 MiB chunks.
    """
    header = read_header(path)
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        f.seek(header.data_offset)
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are copied so safetensors accepts them."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise InvalidConfigError(f"tensor name {name!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise InvalidConfigError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _write_order(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The order in which safetensors lays the tensors out in the data section.

    Found by serialising one-element stand-ins of the same names and dtypes (the layout depends on dtype
    and name only), so it stays right whatever ordering rule the installed safetensors uses.
    """
    probe = {k: torch.zeros(1, dtype=t.dtype) for k, t in tensors.items()}
    blob = _st_save(probe)
    (n,) = struct.unpack("<Q", blob[:8])
    doc = json.loads(blob[8 : 8 + n])
    doc.pop("__metadata__", None)
    return sorted(doc, key=lambda k: doc[k]["data_offsets"][0])


def payload_sha256_of(tensors: Mapping[str, torch.Tensor]) -> str:
    """The :func:`payload_sha256` that ``save_tensors(path, tensors, any_metadata)`` will produce.

    Hashes each tensor's raw little-endian bytes in safetensors' write order, one tensor at a time (each
    moved to the CPU and made contiguous on its own), so no serialised copy of the whole dict is built.
    """
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InvalidConfigError(f"{name!r}: expected a str name and a torch.Tensor, got {type(t).__name__}")
    h = hashlib.sha256()
    for name in _write_order(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- writing
def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsLycoError(f"{_show(path)} exists; pass overwrite/--force")


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it onto ``path``.

    The temporary file (``.<name>.<random>.tmp`` in the same directory, created empty with the default
    permissions) is removed if the block raises or the rename fails, so ``path`` is either the complete new
    file or what it was before. An existing ``path`` raises :class:`FileExistsLycoError` unless
    ``overwrite`` (checked before and again just before the rename).
    """
    target = Path(path)
    if not overwrite:
        _refuse_existing(target)
    directory = target.parent
    if not directory.is_dir():
        raise NotFoundError(f"{_show(path)}: directory {_show(directory)} does not exist")
    tmp: Path | None = None
    for _ in range(16):
        candidate = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        tmp = candidate
        break
    if tmp is None:  # pragma: no cover - 16 collisions of 48 random bits
        raise FileExistsLycoError(f"{_show(path)}: could not create a temporary file next to it")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not overwrite:
            _refuse_existing(target)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success move it onto ``path`` in one rename.

    An existing ``path`` raises :class:`FileExistsLycoError` unless ``overwrite``; then the old folder is moved
    aside, the new one moved in, and only then the old one deleted, so ``path`` is never a half-written folder.
    The temporary folder is removed if the block raises.
    """
    target = Path(path)
    if not overwrite and target.exists():
        raise FileExistsLycoError(f"{_show(path)} exists; pass overwrite/--force")
    if target.exists() and not target.is_dir():
        raise FileExistsLycoError(f"{_show(path)} exists and is not a folder")
    if not target.parent.is_dir():
        raise NotFoundError(f"{_show(path)}: directory {_show(target.parent)} does not exist")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsLycoError(f"{_show(path)} exists; pass overwrite/--force")
            old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, overwrite) as tmp, tmp.open("wb") as f:
        f.write(data)


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` (made contiguous, moved to CPU) and ``metadata`` to a safetensors file atomically.

    Metadata keys and values must be strings (:class:`InvalidConfigError` names the bad key). An existing
    ``path`` raises :class:`FileExistsLycoError` unless ``overwrite``.
    """
    meta: dict[str, str] | None = None
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise InvalidConfigError(f"metadata[{k!r}]: values must be str, got {type(v).__name__}")
        # safetensors 0.8 writes an unreadable header for no tensors + an empty metadata dict; {} means None
        meta = dict(metadata) or None
    prepared = _prepare(tensors)
    with atomic_output(path, overwrite) as tmp:
        _st_save_file(prepared, str(tmp), metadata=meta)
        read_header(tmp)  # never publish a file this module would refuse to read


# --------------------------------------------------------------------------------------------- streaming
#: safetensors dtype name ↔ torch dtype, for the dtypes the streaming reader and writer handle.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def st_dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float16`` → ``"F16"``)."""
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise UnknownFormatError(f"dtype {dtype} cannot be written to safetensors by Lyco") from None


class TensorReader:
    """Reads single tensors of a validated safetensors file with plain ``pread`` calls (no memory map).

    A memory map would make every page of a multi-GB checkpoint count towards the process's resident memory
    as it is touched; reading each tensor into its own buffer keeps the peak at the tensors actually held.
    """

    def __init__(self, path: PathLike, header: SafetensorsHeader | None = None, *, check_finite: bool = False):
        self.path = Path(path)
        self.header = header or read_header(path)
        self.check_finite = check_finite
        self._fd = os.open(self.path, os.O_RDONLY)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise NotFoundError(f"{_show(self.path)}: no tensor {name!r}") from None

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """The tensor ``name`` as a fresh CPU tensor (its own memory, taken from ``pool`` when given)."""
        e = self.entry(name)
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise UnknownFormatError(f"{_show(self.path)}: tensor {name!r}: dtype {e.dtype} is not supported here")
        # not zero-filled, unlike a bytearray
        raw = pool.take(e.nbytes) if pool is not None else torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
        pos, start = 0, self.header.data_offset + e.offsets[0]
        while pos < e.nbytes:
            n = os.preadv(self._fd, [view[pos:]], start + pos)
            if n <= 0:
                raise CorruptFileError(f"{_show(self.path)}: tensor {name!r}: file ends early")
            pos += n
        t = raw.view(dtype).reshape(e.shape)
        if self.check_finite:
            _check_finite(t, name, _show(self.path))
        return t

    def view(self, name: str) -> torch.Tensor:
        """The tensor ``name`` on a read-only memory map of its bytes in the file: no copy, never to be written.

        Only the tensor's own pages are mapped (all at once, where the platform can) and they are unmapped when
        the tensor is freed, so resident memory counts just the tensors held. Falls back to :meth:`get` where a
        map cannot serve (no ``mmap`` flags on this platform, an offset the dtype cannot view, a file that cannot
        be mapped).
        """
        e = self.entry(name)
        dtype = TORCH_DTYPES.get(e.dtype)
        start = self.header.data_offset + e.offsets[0]
        if dtype is None or e.nbytes == 0 or start % dtype.itemsize or not hasattr(mmap, "MAP_SHARED"):
            return self.get(name)
        if os.fstat(self._fd).st_size < start + e.nbytes:  # a map past the end would crash on access (SIGBUS)
            raise CorruptFileError(f"{_show(self.path)}: tensor {name!r}: file ends early")
        base = start - start % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            mm = mmap.mmap(self._fd, start - base + e.nbytes, flags=flags, prot=mmap.PROT_READ, offset=base)
        except OSError:  # a file or filesystem that cannot be mapped: read it instead
            return self.get(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not writable": this tensor is only ever read
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=start - base)
        t = raw.view(dtype).reshape(e.shape)  # the tensor holds the map open until it is freed
        if self.check_finite:
            _check_finite(t, name, _show(self.path))
        return t

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class StreamWriter:
    """Writes a safetensors file one tensor at a time, to a path given by :func:`atomic_output`.

    Bytes go to the device through a :class:`~lyco_core.formats.direct_io.SequentialWriter` (direct I/O where the
    filesystem allows it), not through the page cache.

    Every tensor's name, dtype and shape is declared up front (the header comes first in the format); then
    :meth:`write` is called once per tensor in the declared order. :meth:`finish` checks that all were written.
    """

    def __init__(
        self,
        path: PathLike,
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        doc: dict[str, Any] = {}
        if metadata:
            doc["__metadata__"] = dict(metadata)
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for name, dtype, shape in layout:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            doc[name] = {"dtype": st_dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append((name, dtype, tuple(shape), n))
            offset += n
        head = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        head += b" " * (-len(head) % 8)
        self.path = Path(path)
        self._f = SequentialWriter(self.path)
        self._f.write(struct.pack("<Q", len(head)) + head)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; its name, dtype and shape must be the declared ones."""
        want, dtype, shape, n = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise InvalidConfigError(
                f"{_show(self.path)}: expected {want} {dtype} {list(shape)}, got {name} {tensor.dtype} "
                f"{list(tensor.shape)}"
            )
        if n:
            self._f.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            raise InvalidConfigError(f"{_show(self.path)}: {len(self._order) - self._next} tensor(s) not written")
        self._f.close()

    def abort(self) -> None:
        self._f.abort()


__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "TORCH_DTYPES",
    "LazyTensors",
    "SafetensorsHeader",
    "StreamWriter",
    "TensorEntry",
    "TensorReader",
    "atomic_output",
    "atomic_output_dir",
    "atomic_write_bytes",
    "load_tensors",
    "payload_sha256",
    "payload_sha256_of",
    "read_header",
    "save_tensors",
    "st_dtype_name",
]
