"""A feature cache on disk: one safetensors file per (encoder identity, image sha256 or text, preprocessing).

Files live at ``<folder>/<d[:2]>/<d>.safetensors`` with d the sha256 of the key; each is written atomically
(``save_tensors``) and records its key in the metadata, checked on read. A bounded in-memory LRU keeps recently used
values. A file that cannot be read is recomputed and rewritten (a cache never fails a run).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from lyco_core.errors import CorruptFileError, InvalidConfigError, LycoError, NotFoundError
from lyco_core.formats.safetensors_io import load_tensors, read_header, save_tensors

from .base import Encoder
from .preprocess import ResizeMode

CacheValue = torch.Tensor | list[torch.Tensor]
CacheKey = str | tuple[str, ...]

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path | str) -> str:
    """sha256 hex of a file's bytes (memoised by path, size and mtime for this process)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise NotFoundError(f"{p}: image not found") from e
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[memo] = h.hexdigest()
    return _SHA_MEMO[memo]


def image_source(path: Path | str) -> str:
    """The cache source string of an image file: ``sha256:<hex>`` of its bytes (renames and copies still hit)."""
    return f"sha256:{file_sha256(path)}"


def text_source(text: str) -> str:
    """The cache source string of a text."""
    return f"text:{text}"


def open_image(path: Path | str) -> Image.Image:
    """A fully loaded PIL image (the file is closed); unreadable → :class:`CorruptFileError`."""
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError as e:
        raise NotFoundError(f"{path}: image not found") from e
    except OSError as e:
        raise CorruptFileError(f"{path}: unreadable image ({e})") from e


def _nbytes(v: CacheValue) -> int:
    ts = [v] if isinstance(v, torch.Tensor) else v
    return sum(t.numel() * t.element_size() for t in ts)


class FeatureCache:
    """Features on disk under ``folder`` plus an LRU of at most ``max_memory_bytes`` in memory.

    A value is a tensor or a list of tensors (e.g. VGG maps or Grams). Returned tensors are shared with the cache:
    do not modify them in place. ``hits`` / ``misses`` count :meth:`get` / :meth:`get_many` lookups.
    """

    def __init__(self, folder: Path | str, *, max_memory_bytes: int = 512 * 2**20) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise InvalidConfigError(f"{self.folder}: feature cache path exists and is not a folder")
        self.max_memory_bytes = int(max_memory_bytes)
        self._memory: OrderedDict[str, tuple[CacheValue, int]] = OrderedDict()
        self._memory_bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def make_key(identity: str, source: str, preprocessing: str) -> tuple[str, str, str]:
        """The key of one feature: (encoder identity, ``image_source``/``text_source``, preprocessing string)."""
        return (identity, source, preprocessing)

    @staticmethod
    def _canonical(key: CacheKey) -> str:
        return json.dumps(list(key) if isinstance(key, tuple) else key, ensure_ascii=False)

    def path_for(self, key: CacheKey) -> Path:
        """The file holding ``key``'s value."""
        d = hashlib.sha256(self._canonical(key).encode()).hexdigest()
        return self.folder / d[:2] / f"{d}.safetensors"

    @property
    def memory_bytes(self) -> int:
        """Bytes of tensors held in memory now (≤ ``max_memory_bytes``)."""
        return self._memory_bytes

    def _remember(self, name: str, value: CacheValue) -> None:
        size = _nbytes(value)
        if name in self._memory:
            self._memory_bytes -= self._memory.pop(name)[1]
        if size > self.max_memory_bytes:
            return
        self._memory[name] = (value, size)
        self._memory_bytes += size
        while self._memory_bytes > self.max_memory_bytes:
            self._memory_bytes -= self._memory.popitem(last=False)[1][1]

    def _read(self, path: Path, canonical: str) -> CacheValue | None:
        if not path.is_file():
            return None
        try:
            header = read_header(path)
            if header.metadata.get("key") != canonical:
                return None
            tensors = load_tensors(path)
        except (LycoError, OSError) as e:
            warnings.warn(f"{path}: unreadable cached features, recomputing ({e})", stacklevel=3)
            return None
        if header.metadata.get("layout") == "list":
            return [tensors[f"v.{i}"] for i in range(len(tensors))]
        return tensors["v"]

    def _write(self, path: Path, canonical: str, value: CacheValue) -> None:
        if isinstance(value, torch.Tensor):
            tensors, layout = {"v": value.detach().cpu()}, "tensor"
        else:
            tensors, layout = {f"v.{i}": t.detach().cpu() for i, t in enumerate(value)}, "list"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, tensors, {"key": canonical, "layout": layout}, overwrite=True)

    def lookup(self, key: CacheKey) -> CacheValue | None:
        """The cached value of ``key`` (memory, then disk), or None; does not count hits/misses."""
        canonical = self._canonical(key)
        path = self.path_for(key)
        name = path.stem
        if name in self._memory:
            self._memory.move_to_end(name)
            return self._memory[name][0]
        value = self._read(path, canonical)
        if value is not None:
            self._remember(name, value)
        return value

    def put(self, key: CacheKey, value: CacheValue) -> None:
        """Store ``value`` under ``key`` (atomic file write, replacing any previous one)."""
        path = self.path_for(key)
        self._write(path, self._canonical(key), value)
        self._remember(path.stem, value)

    def get(self, key: CacheKey, compute: Callable[[], CacheValue]) -> CacheValue:
        """The value of ``key``: cached, or ``compute()`` stored then returned."""
        value = self.lookup(key)
        if value is not None:
            self.hits += 1
            return value
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value

    def get_many(
        self, keys: Sequence[CacheKey], compute_missing: Callable[[list[int]], Sequence[CacheValue]]
    ) -> list[CacheValue]:
        """Values of ``keys``; ``compute_missing(indices)`` computes those not cached (one value per index, in
        order), which are then stored."""
        values: list[CacheValue | None] = [self.lookup(k) for k in keys]
        first: dict[CacheKey, int] = {}  # a key asked for twice is computed once, so both get the same value
        missing = [i for i, v in enumerate(values) if v is None and first.setdefault(keys[i], i) == i]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = list(compute_missing(missing))
            if len(computed) != len(missing):
                raise InvalidConfigError(f"feature cache: computed {len(computed)} values for {len(missing)} keys")
            for i, v in zip(missing, computed, strict=True):
                self.put(keys[i], v)
                values[i] = v
        for i, v in enumerate(values):
            if v is None:
                values[i] = values[first[keys[i]]]
        return [v for v in values if v is not None]


def cached_image_values(
    cache: FeatureCache | None,
    paths: Sequence[Path | str],
    *,
    identity: str,
    preprocessing: str,
    compute: Callable[[list[Image.Image]], torch.Tensor],
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-image values (N, …) of image files, computing only the uncached ones, ``batch_size`` images at a time.

    ``compute(images) -> (B, …)`` is any per-image function (e.g. an encoder's features, or flattened Grams of
    VGG maps with ``preprocessing`` naming that); ``cache=None`` computes everything.
    """
    if len(paths) == 0:
        raise InvalidConfigError("no image files given")

    def run(indices: list[int]) -> list[torch.Tensor]:
        rows: list[torch.Tensor] = []
        for s in range(0, len(indices), max(1, batch_size)):
            images = [open_image(paths[i]) for i in indices[s : s + batch_size]]
            rows.extend(t.clone() for t in compute(images).unbind(0))
        return rows

    if cache is None:
        return torch.stack(run(list(range(len(paths)))))
    keys = [FeatureCache.make_key(identity, image_source(p), preprocessing) for p in paths]
    values = cache.get_many(keys, run)
    return torch.stack([v for v in values if isinstance(v, torch.Tensor)])


def cached_image_features(
    encoder: Encoder,
    paths: Sequence[Path | str],
    cache: FeatureCache | None,
    *,
    reference: bool = False,
    mode: ResizeMode | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``encoder.image_features`` of image files → float32 (N, D), through ``cache``."""
    return cached_image_values(
        cache,
        paths,
        identity=encoder.identity,
        preprocessing=encoder.preprocessing(reference=reference, mode=mode),
        compute=lambda imgs: encoder.image_features(imgs, reference=reference, mode=mode, batch_size=batch_size),
        batch_size=batch_size,
    )


def cached_text_features(
    encoder: Encoder, texts: Sequence[str], cache: FeatureCache | None, *, batch_size: int = 64
) -> torch.Tensor:
    """``encoder.text_features`` of ``texts`` → float32 (N, D), through ``cache`` (keyed by the exact text)."""
    if len(texts) == 0:
        raise InvalidConfigError("clip encoder: no texts given")
    if cache is None:
        return encoder.text_features(texts, batch_size=batch_size)
    keys = [FeatureCache.make_key(encoder.identity, text_source(t), "text") for t in texts]

    def run(indices: list[int]) -> list[torch.Tensor]:
        return [t.clone() for t in encoder.text_features([texts[i] for i in indices], batch_size=batch_size).unbind(0)]

    values = cache.get_many(keys, run)
    return torch.stack([v for v in values if isinstance(v, torch.Tensor)])
