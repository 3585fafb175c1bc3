"""The dataset: :func:`discover` (folders → items + report), :func:`plan_epoch` (batches), :func:`load_image`.

:func:`discover` reads only the file system (never a model), so a missing folder, an empty dataset or a bad
``concept.toml`` fails in a second with a one-line error naming the folder or file. The epoch plan is a pure
function of (dataset, config, batch size, seed, epoch): a resumed run recomputes the same order.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, Field

from lyco_core.errors import CorruptFileError, NotFoundError

from ..config import ConceptConfig, DataConfig
from .balance import concept_targets, group_repeats
from .buckets import assign_bucket, buckets_for, crop_box
from .concepts import (
    Concept,
    ImageItem,
    SkippedFile,
    check_folder,
    folders_with_images,
    make_concept,
    probe_image,
    read_caption,
    scan_folder,
)

Bucket = tuple[int, int]


class ConceptReport(BaseModel):
    """One concept in the report. ``samples_per_epoch`` counts repeats and balancing; ``effective_repeats`` is
    ``samples_per_epoch / images``."""

    name: str
    path: str
    category: str | None
    class_name: str
    subclass: str | None
    trigger: str
    class_word: str | None
    images: int
    missing_captions: int
    repeats: int
    samples_per_epoch: int
    effective_repeats: float


class DataReport(BaseModel):
    """What :func:`discover` found: usable images per concept, skipped files with reasons, warnings, balancing."""

    root: str | None = None
    concepts: list[ConceptReport] = Field(default_factory=list)
    images: int = 0
    samples_per_epoch: int = 0
    balance: bool = True
    buckets: dict[str, int] = Field(default_factory=dict, description='images per bucket, "WxH" → count')
    skipped: list[SkippedFile] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        """Skipped files per kind (not-image, unreadable, corrupt, orphan-caption)."""
        return dict(Counter(s.kind for s in self.skipped))

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the training log."""
        mode = "balanced" if self.balance else "not balanced"
        lines = [
            f"data: {len(self.concepts)} concept(s), {self.images} image(s), {self.samples_per_epoch} samples per "
            f"epoch ({mode})"
        ]
        for c in self.concepts:
            descriptor = " ".join(p for p in (c.trigger, c.class_word) if p) or "(no descriptor)"
            lines.append(
                f"  {c.name}: {c.images} image(s) × {c.effective_repeats:.2f} = {c.samples_per_epoch} per epoch "
                f"(repeats {c.repeats}, descriptor {descriptor!r})"
            )
        if self.buckets:
            lines.append("  buckets: " + ", ".join(f"{k}: {v}" for k, v in self.buckets.items()))
        if self.skipped:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped_counts().items()))
            lines.append(f"skipped {len(self.skipped)} file(s): {counts}")
            lines.extend(f"  {s.path}: {s.reason}" for s in self.skipped[:20])
            if len(self.skipped) > 20:
                lines.append(f"  … and {len(self.skipped) - 20} more")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return lines


@dataclass
class Dataset:
    """Usable images (sorted by concept, then file name), their concepts, and the discovery report."""

    items: list[ImageItem]
    concepts: list[Concept]
    report: DataReport

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Batch:
    """Images trained together; all share ``bucket`` = (width, height) in pixels."""

    items: list[ImageItem]
    bucket: Bucket


EpochPlan = list[Batch]


def _overrides(cc: ConceptConfig) -> dict[str, object]:
    fields = cc.model_fields_set - {"path"}
    return {k: getattr(cc, k) for k in fields if getattr(cc, k) is not None}


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def _concept_folders(cfg: DataConfig) -> list[tuple[Path, str, list[str] | None, dict[str, object], str | None]]:
    """(folder, name, parts below root or None, explicit overrides, config key if explicit) in dataset order."""
    explicit: dict[Path, tuple[int, ConceptConfig]] = {}
    for i, cc in enumerate(cfg.concepts):
        check_folder(Path(cc.path), f"data.concepts[{i}].path")
        explicit.setdefault(Path(cc.path).resolve(), (i, cc))
    out: list[tuple[Path, str, list[str] | None, dict[str, object], str | None]] = []
    taken: set[str] = set()
    root = Path(cfg.root) if cfg.root is not None else None
    if root is not None:
        check_folder(root, "data.root")
        for folder in folders_with_images(root):
            parts = list(folder.relative_to(root).parts)
            name = "/".join(parts) or root.name
            hit = explicit.pop(folder.resolve(), None)
            over, key = (_overrides(hit[1]), f"data.concepts[{hit[0]}].path") if hit else ({}, None)
            out.append((folder, _unique(name, taken), parts, over, key))
    root_abs = root.resolve() if root is not None else None
    for path, (i, cc) in sorted(explicit.items(), key=lambda kv: kv[1][0]):
        below: list[str] | None = None
        if root_abs is not None and path.is_relative_to(root_abs):
            below = list(path.relative_to(root_abs).parts)
        folder = Path(cc.path)
        out.append((folder, _unique(folder.name, taken), below, _overrides(cc), f"data.concepts[{i}].path"))
    return out


def _first(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f", … ({len(names)} in all)" if len(names) > k else "")


def discover(cfg: DataConfig) -> Dataset:
    """Find the concepts and usable images of ``cfg`` (see :mod:`.concepts` for the folder rules).

    Raises NotFoundError (missing folder, no usable image at all, an explicit concept folder without usable
    images) or InvalidConfigError (a path that is not a folder, a bad ``concept.toml``), one line naming it.
    """
    report = DataReport(root=str(cfg.root) if cfg.root is not None else None, balance=cfg.balance)
    concepts: list[Concept] = []
    items: list[ImageItem] = []
    missing: dict[str, int] = {}
    for folder, name, parts, over, key in _concept_folders(cfg):
        concept = make_concept(folder, name=name, parts=parts, overrides=over)
        scan = scan_folder(folder, cfg.caption_extension)
        report.skipped.extend(scan.skipped)
        found: list[ImageItem] = []
        no_caption: list[str] = []
        for path in scan.images:
            size, skip = probe_image(path)
            if size is None:
                assert skip is not None
                report.skipped.append(skip)
                continue
            caption: str | None = None
            cap_path = scan.captions.get(path.stem)
            if cap_path is not None:
                caption, warning = read_caption(cap_path)
                if warning:
                    report.warnings.append(warning)
            if caption is None:
                no_caption.append(path.name)
            found.append(ImageItem(path=path, caption=caption, concept=concept, size=size))
        if not found:
            bad = sum(1 for s in report.skipped if Path(s.path).parent == folder)
            if key is not None:
                hint = "" if bad else " (sub-folders are not searched; use data.root for a tree)"
                raise NotFoundError(f"{key}: no usable image in {folder} ({bad} file(s) skipped){hint}")
            report.warnings.append(f"{folder}: no usable image ({bad} file(s) skipped); folder ignored")
            continue
        if no_caption:
            report.warnings.append(
                f"{concept.name}: {len(no_caption)} image(s) without a caption file use the descriptor "
                f"{concept.descriptor!r} alone: {_first(no_caption)}"
            )
        missing[concept.name] = len(no_caption)
        concepts.append(concept)
        items.extend(found)
    if not items:
        where = str(cfg.root) if cfg.root is not None else ", ".join(str(c.path) for c in cfg.concepts)
        key = "data.root" if cfg.root is not None else "data.concepts"
        raise NotFoundError(f"{key}: no usable image found in {where} ({len(report.skipped)} file(s) skipped)")

    counts = Counter(it.concept.name for it in items)
    repeats = {c.name: c.repeats for c in concepts}
    targets = concept_targets(counts, repeats, cfg.balance)
    for c in concepts:
        report.concepts.append(
            ConceptReport(
                name=c.name, path=str(c.path), category=c.category, class_name=c.class_name, subclass=c.subclass,
                trigger=c.trigger, class_word=c.class_word, images=counts[c.name], missing_captions=missing[c.name],
                repeats=c.repeats, samples_per_epoch=targets[c.name],
                effective_repeats=targets[c.name] / counts[c.name],
            )
        )
    report.images = len(items)
    report.samples_per_epoch = sum(targets.values())
    buckets = buckets_for(cfg)
    per_bucket = Counter(assign_bucket(it.size, buckets) for it in items)
    report.buckets = {f"{w}x{h}": per_bucket[(w, h)] for (w, h) in sorted(per_bucket)}
    if cfg.buckets and len(buckets) == 1 and any(it.size[0] != it.size[1] for it in items):
        report.warnings.append(
            f"only the square bucket exists (data.bucket_min {cfg.bucket_min} >= data.resolution "
            f"{cfg.resolution}): non-square images are cropped to squares"
        )
    return Dataset(items=items, concepts=concepts, report=report)


def epoch_samples(dataset: Dataset, cfg: DataConfig, epoch: int) -> dict[Bucket, list[ImageItem]]:
    """The samples of one epoch by bucket (images repeated per :mod:`.balance`), in dataset order (unshuffled)."""
    buckets = buckets_for(cfg)
    groups: dict[tuple[str, Bucket], list[ImageItem]] = {}
    for it in dataset.items:
        groups.setdefault((it.concept.name, assign_bucket(it.size, buckets)), []).append(it)
    repeats = {c.name: c.repeats for c in dataset.concepts}
    reps = group_repeats({k: (k[0], len(v)) for k, v in groups.items()}, repeats, cfg.balance, epoch)
    out: dict[Bucket, list[ImageItem]] = {}
    for key, members in groups.items():
        dest = out.setdefault(key[1], [])
        for it, r in zip(members, reps[key]):
            dest.extend([it] * r)
    return out


def batches_per_epoch(dataset: Dataset, cfg: DataConfig, batch_size: int) -> int:
    """len(plan_epoch(...)): the same for every epoch and seed (each bucket's last batch may be smaller)."""
    return sum(-(-len(s) // batch_size) for s in epoch_samples(dataset, cfg, 0).values())


def plan_epoch(dataset: Dataset, cfg: DataConfig, batch_size: int, seed: int, epoch: int) -> EpochPlan:
    """The batches of epoch ``epoch``: a deterministic function of (dataset, cfg, batch_size, seed, epoch).

    Each bucket's samples are shuffled and cut into batches of ``batch_size`` (the last one may be smaller), then
    the batches of all buckets are shuffled together; a batch never mixes buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(f"lyco-data:{seed}:{epoch}")
    batches: list[Batch] = []
    for bucket, samples in sorted(epoch_samples(dataset, cfg, epoch).items()):
        rng.shuffle(samples)
        batches.extend(Batch(samples[i : i + batch_size], bucket) for i in range(0, len(samples), batch_size))
    rng.shuffle(batches)
    return batches


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, transparent areas composited on white, 16-bit/float greyscale scaled to 8 bits."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float32)
        if arr.max(initial=0.0) > 255.0:
            arr = arr * (255.0 / 65535.0)
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(item: ImageItem, bucket: Bucket) -> torch.Tensor:
    """The image as a (3, H, W) float32 tensor in [-1, 1], (W, H) = ``bucket``.

    EXIF orientation applied, transparency on white, scaled (Lanczos) to cover the bucket and center-cropped
    (:func:`.buckets.crop_box`). Raises CorruptFileError naming the file if it no longer decodes.
    """
    try:
        with Image.open(item.path) as raw:
            im = _to_rgb(ImageOps.exif_transpose(raw))
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0]
        raise CorruptFileError(f"{item.path}: cannot load image ({type(e).__name__}: {why})") from None
    crop = crop_box(im.size, bucket)
    if im.size != crop.resized:
        im = im.resize(crop.resized, Image.Resampling.LANCZOS)
    im = im.crop((crop.left, crop.top, crop.left + bucket[0], crop.top + bucket[1]))
    arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0
