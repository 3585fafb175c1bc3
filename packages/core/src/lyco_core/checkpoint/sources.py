"""The files of a base model on disk and the tensors in them, read one tensor at a time.

A base is one of:

* a diffusers folder: a pipeline (``model_index.json`` with ``unet/``, ``text_encoder/``, ``text_encoder_2/`` …)
  or one model's folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, sharded
  or not, any variant such as ``.fp16.safetensors``);
* a safetensors state dict with diffusers names (e.g. a UNet's ``diffusion_pytorch_model.safetensors``);
* an LDM single-file checkpoint (``model.diffusion_model.…``, ``cond_stage_model.…``, ``conditioner.embedders.…``),
  as ``.safetensors`` or, loaded with ``torch.load(weights_only=True)``, as ``.ckpt``.

Each weight file becomes a :class:`TensorSource`; :mod:`.components` says which parts of it are a UNet or a text
encoder and how they are named.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..buffers import BufferPool
from ..errors import CorruptFileError, NotFoundError, UnknownFormatError
from ..formats.safetensors_io import TensorReader, read_header

#: Subfolders of a diffusers pipeline that hold an adaptable model, and their role.
PIPELINE_ROLES: Mapping[str, str] = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}


class TensorSource(Protocol):
    """One weight file: tensor names in file order, their shapes/dtypes, and single-tensor reads."""

    path: Path
    names: list[str]
    metadata: dict[str, str]

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        """The tensor as a fresh CPU tensor (its own memory, taken from ``pool`` when given)."""
        ...

    def view(self, name: str) -> torch.Tensor:
        """The tensor without a copy where the file allows it (a memory map); the caller must never write to it."""
        ...

    def close(self) -> None: ...


class SafetensorsSource:
    """A safetensors weight file, read with :class:`~lyco_core.formats.safetensors_io.TensorReader` (no mmap)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader = TensorReader(path, read_header(path))
        self.names = list(self._reader.header.tensors)
        self.metadata = dict(self._reader.header.metadata)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._reader.entry(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        from ..formats.safetensors_io import TORCH_DTYPES

        st = self._reader.entry(name).dtype
        if st not in TORCH_DTYPES:
            raise UnknownFormatError(f"{self.path}: tensor {name!r} has dtype {st}, which Lyco cannot bake")
        return TORCH_DTYPES[st]

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        return self._reader.get(name, pool)

    def view(self, name: str) -> torch.Tensor:
        return self._reader.view(name)

    def close(self) -> None:
        self._reader.close()


class TorchSource:
    """A pickled ``.ckpt``/``.pt`` state dict, loaded only with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unpickling failure means a file we cannot use
            msg = " ".join(str(e).split())[:200]
            raise CorruptFileError(f"{path}: cannot be loaded with torch.load(weights_only=True): {msg}") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UnknownFormatError(f"{path}: not a state dict (found {type(obj).__name__})")
        self._sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self.names = list(self._sd)
        self.metadata: dict[str, str] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._sd[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._sd[name].dtype

    def get(self, name: str, pool: BufferPool | None = None) -> torch.Tensor:
        t = self._sd[name]
        if pool is None:
            return t.clone()
        raw = pool.take(t.numel() * t.element_size())
        return raw.view(t.dtype).reshape(t.shape).copy_(t)

    def view(self, name: str) -> torch.Tensor:
        return self._sd[name]  # loaded with mmap=True: already a map of the file

    def close(self) -> None:
        self._sd = {}


def open_source(path: Path) -> TensorSource:
    """A :class:`TensorSource` for a ``.safetensors`` or ``.ckpt``/``.pt``/``.pth`` file."""
    if not path.is_file():
        raise NotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsSource(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return TorchSource(path)
    raise UnknownFormatError(f"{path}: unknown weight file type {suffix!r}; expected .safetensors or .ckpt")


@dataclass
class FolderPart:
    """One subfolder (or the root) of a diffusers folder: its role, config and weight files."""

    subdir: str
    role: str | None
    config: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return doc


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("*.bin")):
        raise UnknownFormatError(
            f"{folder}: only pickled .bin weights; convert them to .safetensors first (Lyco bakes safetensors folders)"
        )
    return files


def _role_from_config(config: Mapping[str, Any]) -> str | None:
    name = str(config.get("_class_name") or (config.get("architectures") or [""])[0])
    if name.startswith("UNet"):
        return "unet"
    if name.startswith("CLIPText"):
        return "te"
    return None


def folder_parts(folder: Path) -> list[FolderPart]:
    """The parts of a diffusers folder that hold weights; roles for the UNet / text encoders, None for the rest."""
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        has_te2 = "text_encoder_2" in index or (folder / "text_encoder_2").is_dir()
        parts: list[FolderPart] = []
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            role = PIPELINE_ROLES.get(sub.name)
            if role == "te" and has_te2:
                role = "te1"
            cfg_path = sub / "config.json"
            cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
            files = _weight_files(sub) if role else sorted(sub.glob("*.safetensors"))
            parts.append(FolderPart(sub.name, role, cfg, files))
        return parts
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        return [FolderPart("", _role_from_config(cfg), cfg, _weight_files(folder))]
    raise UnknownFormatError(f"{folder}: not a diffusers folder (no model_index.json or config.json)")
