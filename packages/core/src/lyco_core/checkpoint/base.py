"""A base model on disk as adapters see it: adaptable layers by kohya key, their weights, and the family."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NotFoundError, UnknownFormatError
from ..formats.metadata import Family
from .components import Component, Target, component_targets, detect_components
from .sources import FolderPart, TensorSource, folder_parts, open_source

#: Cross-attention width (in-dim of attn2.to_k) of the released families.
CROSS_ATTENTION_FAMILY: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass
class BaseCheckpoint:
    """An opened base model: its weight files, components, layers (:class:`Target`) and family.

    Layers are looked up by any key an adapter file may use (:meth:`resolve`); :meth:`weight` reads one layer's
    weight and bias (sliced for fused OpenCLIP q/k/v), one tensor at a time from disk.
    """

    path: Path
    kind: str  # "diffusers-folder" | "state-dict" | "ldm"
    sources: list[TensorSource]
    parts: list[FolderPart]
    components: list[Component]
    family: Family
    evidence: list[str]
    targets: dict[str, Target] = field(default_factory=dict)
    _index: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        """Canonical kohya key of every adaptable layer."""
        return list(self.targets)

    def __iter__(self) -> Iterator[Target]:
        return iter(self.targets.values())

    def resolve(self, file_key: str) -> str | None:
        """The canonical key for any key a file may use (diffusers/LDM UNet names, ``lora_te``/``lora_te1``,
        ``lycoris_``), or None."""
        return self._index.get(file_key)

    def target(self, key: str) -> Target:
        canonical = self.resolve(key)
        if canonical is None:
            raise NotFoundError(f"{self.path}: no layer for adapter key {key!r}")
        return self.targets[canonical]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.target(key).shape

    def diffusers_path(self, key: str) -> tuple[str, str]:
        """(role, dotted module path) of a layer: diffusers naming for the UNet, HF CLIP for text encoders."""
        t = self.target(key)
        return t.role, t.path

    def weight(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's (weight, bias) in the base's dtype, read from disk (row-sliced for fused tensors)."""
        t = self.target(key)
        src = self.sources[t.source]
        w = src.get(t.weight)
        b = src.get(t.bias) if t.bias is not None else None
        if t.rows is not None:
            w = w[t.rows[0] : t.rows[1]].clone()
            b = b[t.rows[0] : t.rows[1]].clone() if b is not None else None
        return w, b

    def __call__(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same as :meth:`weight`: a BaseCheckpoint is a ``key → (W, b)`` callable for the ops."""
        return self.weight(key)

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self) -> BaseCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detect_family(sources: list[TensorSource], components: list[Component]) -> tuple[Family, list[str]]:
    """The family of a base, with the evidence: cross-attention width first, then structure."""
    evidence: list[str] = []
    width_family: Family = "unknown"
    unet = [c for c in components if c.role == "unet"]
    for c in unet:
        src = sources[c.source]
        for n in src.names:
            if n.startswith(c.prefix) and ".attn2.to_k.weight" in n:
                width = src.shape(n)[1]
                width_family = CROSS_ATTENTION_FAMILY.get(width, "unknown")
                evidence.append(f"cross-attention width {width} ({n}) → {width_family}")
                break
    roles = {c.role for c in components}
    structure: Family = "unknown"
    if "te2" in roles:
        structure = "sdxl"
        evidence.append("two text encoders → sdxl")
    elif any(n.startswith(c.prefix + p) for c in unet for n in sources[c.source].names
             for p in ("add_embedding.", "label_emb.")):
        structure = "sdxl"
        evidence.append("UNet has add_embedding/label_emb (size conditioning) → sdxl")
    elif any(c.naming == "openclip" for c in components):
        structure = "sd2"
        evidence.append("OpenCLIP text encoder → sd2")
    else:
        for c in unet:
            src = sources[c.source]
            proj = next((n for n in src.names if n.startswith(c.prefix) and n.endswith("proj_in.weight")), None)
            if proj is not None:
                conv = len(src.shape(proj)) == 4
                structure = "sd1" if conv else "sd2"
                evidence.append(f"proj_in is {'a 1×1 conv' if conv else 'linear'} → {structure} layout")
                break
    family = width_family if width_family != "unknown" else structure
    if width_family != "unknown" and structure not in ("unknown", width_family):
        evidence.append(f"conflict: structure says {structure}, width says {width_family}; using {width_family}")
    if not components:
        evidence.append("no UNet or text encoder found")
    return family, evidence


def open_base(path: str | Path) -> BaseCheckpoint:
    """Open a base model (see :mod:`.sources` for what it may be). Nothing but headers is read yet."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"{p}: no such file or folder")
    sources: list[TensorSource] = []
    components: list[Component] = []
    parts: list[FolderPart] = []
    if p.is_dir():
        kind = "diffusers-folder"
        parts = folder_parts(p)
        for part in parts:
            if part.role is None:
                continue
            for f in part.files:
                sources.append(open_source(f))
                components += detect_components(sources[-1], len(sources) - 1, part.role, part.config)
    else:
        sources.append(open_source(p))
        components = detect_components(sources[0], 0, None, {})
        kind = "ldm" if any(c.naming in ("ldm", "openclip") or c.prefix for c in components) else "state-dict"
    if not components:
        for s in sources:
            s.close()
        raise UnknownFormatError(f"{p}: found no UNet or CLIP text encoder weights in it")
    family, evidence = detect_family(sources, components)
    base = BaseCheckpoint(p, kind, sources, parts, components, family, evidence)
    for comp in components:
        for t in component_targets(comp, sources[comp.source], family):
            if t.key in base.targets:
                continue  # the same layer in another variant file (e.g. .fp16.safetensors): first file wins
            base.targets[t.key] = t
            for alias in t.aliases:
                other = base._index.setdefault(alias, t.key)
                if other != t.key:
                    raise UnknownFormatError(f"{p}: key {alias!r} would name both {other!r} and {t.key!r}")
    return base
