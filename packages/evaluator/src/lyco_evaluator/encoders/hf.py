"""Finding and loading transformers model folders offline (``save_pretrained`` layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lyco_core.errors import NotFoundError, UnknownFormatError

from .base import file_fingerprint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_folder(path: Path | str, kind: str) -> Path:
    """A local ``save_pretrained`` folder for ``path``: the folder itself, or a hub id's snapshot in the local HF
    cache (never downloads). Anything else raises :class:`NotFoundError` naming ``path``."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise NotFoundError(f"{p}: no config.json; the {kind} encoder needs a transformers save_pretrained folder")
        return p
    if p.exists():
        raise UnknownFormatError(f"{p}: the {kind} encoder expects a transformers save_pretrained folder, not a file")
    if _HUB_ID.match(str(path)):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(path), local_files_only=True))
        except Exception as e:  # not cached: offline, so report it as missing
            where = "not a folder, not in the local HF cache"
            raise NotFoundError(f"{path}: {kind} encoder weights not found ({where})") from e
    raise NotFoundError(f"{p}: {kind} encoder weights not found")


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnknownFormatError(f"{folder / 'config.json'}: unreadable ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise UnknownFormatError(f"{folder / 'config.json'}: not a JSON object")
    return data


def folder_fingerprint(folder: Path, extra_names: tuple[str, ...] = ()) -> str:
    """Fingerprint of a model folder: config.json, its weight files and ``extra_names`` (e.g. tokenizer files)."""
    files = [folder / "config.json"]
    files += [f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES]
    files += [folder / n for n in extra_names if (folder / n).is_file()]
    return file_fingerprint(files)


def from_pretrained(cls: Any, folder: Path, kind: str) -> Any:
    """``cls.from_pretrained(folder, local_files_only=True)`` in float32, eval mode; missing weights → one-line
    :class:`NotFoundError`."""
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, dtype="float32")
    except OSError as e:
        raise NotFoundError(f"{folder}: {kind} encoder weights not found ({str(e).splitlines()[0][:160]})") from e
    return model.eval()
