"""Image generation for the evaluation: every checkpoint (and the base alone) on every prompt × seed, cached.

:func:`generate` loads the base once (``lyco_trainer.models.load_base``), builds a diffusers
``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) from its components with a DDIM scheduler made
from the base's scheduler config (SD's released sampler settings: no sample clipping, ``steps_offset`` 1, the
final alpha not forced to 1 — the same timesteps as A1111's DDIM the paper used) and no safety checker. For each
adapter it loads the file with ``lyco_core.load_network`` at the checkpoint's strength, applies it, generates, and
restores the base. A checkpoint that is a diffusers pipeline folder (a full fine-tune) is loaded on its own.

Noise: image k gets a CPU ``torch.Generator`` seeded with its own seed, so an image does not depend on the batch it
was made in or on the device (up to floating-point differences between devices).

Cache: ``out_dir/images/<key>.png`` with ``key`` = sha256 of (base model files, checkpoint payload hash,
strength, prompt, seed, settings: scheduler, steps, guidance, size, negative prompt, dtype). A re-run generates
only the images that are missing and does not load any model when none is. File hashes are remembered in
``out_dir/images/hashes.json`` by (path, size, mtime) so big files are read once. Every call writes
``out_dir/generated.json``: the records it returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from lyco_core.errors import CorruptFileError, InvalidConfigError, NotFoundError
from lyco_core.formats.safetensors_io import atomic_output, payload_sha256
from lyco_core.progress import ProgressCallback, progress
from lyco_trainer.config import ModelConfig

from .config import BASE_ID, CheckpointSpec, EvalConfig, base_checkpoint
from .prompts import PromptSpec

CACHE_VERSION = 1
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GeneratedImage(BaseModel):
    """One generated image. ``index``: its position among the N images of its (concept, prompt_type) set — the
    official pairing index (image k ↔ expanded prompt line k ↔ the base model's image k). ``cached``: it was
    already on disk."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    concept: str
    prompt_type: str
    prompt: str
    seed: int
    index: int
    strength: float
    key: str
    path: Path
    cached: bool = False


# --------------------------------------------------------------------------------------------- hashing
class HashCache:
    """sha256 of files, remembered by (absolute path, size, mtime_ns) in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
                if isinstance(doc, dict):
                    self.entries = {k: v for k, v in doc.items() if isinstance(v, dict)}
            except (OSError, ValueError):
                self.entries = {}  # a damaged cache is rebuilt, never trusted

    def file(self, path: Path, *, payload: bool = False) -> str:
        """sha256 of ``path``; ``payload``: of a safetensors file's data section (metadata edits do not count)."""
        p = path.resolve()
        st = p.stat()
        kind = "payload" if payload else "file"
        name = f"{kind}:{p}"
        hit = self.entries.get(name)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit["sha256"])
        digest = payload_sha256(p) if payload else _sha256_file(p)
        self.entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def tree(self, path: Path) -> str:
        """One hash for a file, or for a folder: its files' relative paths and hashes (hidden files skipped)."""
        if path.is_file():
            return self.file(path)
        h = hashlib.sha256()
        for f in sorted(q for q in path.rglob("*") if q.is_file()):
            rel = f.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\0{self.file(f)}\n".encode())
        return h.hexdigest()

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        self.dirty = False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def base_identity(model: ModelConfig, hashes: HashCache) -> str:
    """A hash of everything that makes the base what it is: its files, a VAE/tokenizer/config override, and
    the family/prediction settings."""
    for key, value in (("model.base", model.base), ("model.vae", model.vae), ("model.tokenizer", model.tokenizer),
                       ("model.config_dir", model.config_dir)):
        if value is not None and not Path(value).exists():
            raise NotFoundError(f"{value}: no such file or folder ({key})")
    parts = {
        "base": hashes.tree(Path(model.base)),
        "vae": hashes.tree(Path(model.vae)) if model.vae is not None else None,
        "tokenizer": hashes.tree(Path(model.tokenizer)) if model.tokenizer is not None else None,
        "config_dir": hashes.tree(Path(model.config_dir)) if model.config_dir is not None else None,
        "family": model.family,
        "prediction": model.prediction,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def checkpoint_identity(spec: CheckpointSpec, hashes: HashCache) -> str | None:
    """The adapter's payload hash (a .safetensors file; any other file: its bytes), a pipeline folder's tree hash,
    None for the base."""
    if spec.kind == "base":
        return None
    if spec.path is None:
        raise InvalidConfigError(f"checkpoint {spec.id!r}: no path")
    path = Path(spec.path)
    if spec.kind == "model":
        return hashes.tree(path)
    return hashes.file(path, payload=path.suffix.lower() == ".safetensors")


def settings_of(cfg: EvalConfig, dtype: str) -> dict[str, Any]:
    """The generation settings that change an image (the device does not enter: noise is drawn on the CPU)."""
    g = cfg.generation
    return {
        "scheduler": g.scheduler,
        "steps": g.steps,
        "guidance": g.guidance,
        "width": g.width,
        "height": g.height,
        "negative_prompt": g.negative_prompt,
        "dtype": dtype,
    }


def image_key(base: str, checkpoint: str | None, strength: float, prompt: str, seed: int,
              settings: dict[str, Any]) -> str:
    """The cache key of one image (64 hex characters)."""
    doc = {"v": CACHE_VERSION, "base": base, "checkpoint": checkpoint, "strength": float(strength),
           "prompt": prompt, "seed": int(seed), "settings": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- pipelines
def resolve_dtype(cfg: EvalConfig, device: str) -> str:
    """``generation.dtype`` with ``auto`` resolved: fp16 on CUDA, fp32 elsewhere."""
    if cfg.generation.dtype != "auto":
        return cfg.generation.dtype
    return "fp16" if device.startswith("cuda") else "fp32"


def make_scheduler(models: Any, name: str) -> Any:
    """The sampling scheduler from the base's scheduler config (same betas and prediction type)."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    prediction = "v_prediction" if getattr(models, "prediction", "epsilon") == "v" else "epsilon"
    config = models.scheduler.config
    if name == "ddim":
        # SD's released sampler config; keyword overrides because values that were defaults in the config dict
        # (``_use_default_values``) would be ignored by from_config
        return DDIMScheduler.from_config(config, clip_sample=False, steps_offset=1, set_alpha_to_one=False,
                                         prediction_type=prediction)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config, steps_offset=1, prediction_type=prediction)
    raise InvalidConfigError(f"generation.scheduler: unknown scheduler {name!r} (ddim, euler_a)")


def build_pipeline(models: Any, scheduler: str = "ddim") -> Any:
    """A diffusers pipeline on the loaded components (nothing copied; no safety checker, no progress bar)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = make_scheduler(models, scheduler)
    tes, toks = list(models.text_encoders), list(models.tokenizers)
    pipe: Any
    if models.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=toks[0], tokenizer_2=toks[1],
            unet=models.unet, scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=models.vae, text_encoder=tes[0], tokenizer=toks[0], unet=models.unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(models: Any) -> dict[str, torch.nn.Module]:
    """The modules an adapter file may target, by role (``unet``, ``te`` or ``te1``/``te2``)."""
    tes = list(models.text_encoders)
    if len(tes) == 2:
        return {"unet": models.unet, "te1": tes[0], "te2": tes[1]}
    return {"unet": models.unet, "te": tes[0]}


# --------------------------------------------------------------------------------------------- jobs
class _Job:
    __slots__ = ("index", "key", "path", "prompt", "record", "seed")

    def __init__(self, prompt: PromptSpec, seed: int, index: int, key: str, path: Path,
                 record: GeneratedImage) -> None:
        self.prompt, self.seed, self.index, self.key, self.path, self.record = prompt, seed, index, key, path, record


def _batches(jobs: list[_Job], size: int) -> list[list[_Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def _save_png(image: Any, path: Path, job: _Job, checkpoint: CheckpointSpec, cfg: EvalConfig) -> None:
    from PIL.PngImagePlugin import PngInfo

    g = cfg.generation
    info = PngInfo()
    info.add_text("prompt", job.prompt.text)
    info.add_text(
        "lyco-eval",
        json.dumps({"checkpoint": checkpoint.id, "strength": checkpoint.strength, "seed": job.seed,
                    "scheduler": g.scheduler, "steps": g.steps, "guidance": g.guidance,
                    "negative_prompt": g.negative_prompt}),
    )
    with atomic_output(path, overwrite=True) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


@contextlib.contextmanager
def _adapter(models: Any, spec: CheckpointSpec, device: str, dtype: torch.dtype) -> Iterator[None]:
    """The adapter of ``spec`` applied at its strength inside the block; the base restored after."""
    import lyco_core

    if spec.kind != "adapter":
        yield
        return
    assert spec.path is not None
    network, _ = lyco_core.load_network(spec.path, components(models), multiplier=spec.strength)
    network.to(device=device, dtype=dtype)
    network.eval()
    network.apply()
    try:
        yield
    finally:
        network.restore()


def _run_batch(pipe: Any, batch: list[_Job], cfg: EvalConfig) -> list[Any]:
    g = cfg.generation
    texts = [j.prompt.text for j in batch]
    # SDXL zeroes the unconditional embedding only when no negative prompt is given (its released behaviour)
    negative = [g.negative_prompt] * len(batch) if g.negative_prompt else None
    generators = [torch.Generator(device="cpu").manual_seed(j.seed) for j in batch]
    with torch.no_grad():
        out = pipe(prompt=texts, negative_prompt=negative, num_inference_steps=g.steps, guidance_scale=g.guidance,
                   width=g.width, height=g.height, generator=generators, output_type="pil")
    images = list(out.images)
    if len(images) != len(batch):
        raise CorruptFileError(f"pipeline returned {len(images)} images for a batch of {len(batch)}")
    return images


def generate(
    cfg: EvalConfig,
    checkpoints: Sequence[CheckpointSpec],
    prompts: Sequence[PromptSpec],
    out_dir: str | Path,
    *,
    callback: ProgressCallback | None = None,
    on_batch: Callable[[str, int], None] | None = None,
) -> list[GeneratedImage]:
    """Every checkpoint on every prompt × seed; the base alone too (id ``"base"``) when
    ``cfg.generation.base_reference``. Returns one record per image, checkpoint by checkpoint (base first), in
    prompt order; images already in the cache are not generated again.

    ``callback(done, total)`` reports progress in images; ``on_batch(checkpoint_id, n)`` is called after every
    pipeline call (``n`` images). Raises lyco_core errors naming the file for a bad base or adapter.
    """
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    hashes = HashCache(img_dir / "hashes.json")
    device = cfg.resolved_device()
    dtype_name = resolve_dtype(cfg, device)
    settings = settings_of(cfg, dtype_name)

    specs: list[CheckpointSpec] = []
    if cfg.generation.base_reference and not any(c.kind == "base" for c in checkpoints):
        specs.append(base_checkpoint())
    specs.extend(checkpoints)
    ids = [c.id for c in specs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidConfigError(f"checkpoints: id {dup!r} is used twice")

    base_id = base_identity(cfg.model, hashes)
    records: list[GeneratedImage] = []
    pending: dict[str, list[_Job]] = {}
    queued: set[str] = set()
    for spec in specs:
        ck_hash = checkpoint_identity(spec, hashes)
        # a pipeline folder replaces the base: its files are the "base" of its images
        own_base, ck_key = (ck_hash, None) if spec.kind == "model" else (base_id, ck_hash)
        strength = spec.strength if spec.kind == "adapter" else 0.0
        for p in prompts:
            for j, seed in enumerate(p.seeds):
                key = image_key(own_base or base_id, ck_key, strength, p.text, seed, settings)
                path = img_dir / f"{key}.png"
                rec = GeneratedImage(checkpoint=spec.id, concept=p.concept, prompt_type=p.prompt_type,
                                     prompt=p.text, seed=seed, index=p.first_image + j, strength=spec.strength,
                                     key=key, path=path, cached=path.is_file())
                records.append(rec)
                if not rec.cached and key not in queued:  # the same image asked twice is made once
                    queued.add(key)
                    pending.setdefault(spec.id, []).append(_Job(p, seed, rec.index, key, path, rec))
    hashes.save()

    total = sum(len(v) for v in pending.values())
    if total:
        _generate_pending(cfg, specs, pending, device, _DTYPES[dtype_name], total, callback, on_batch)
    _write_index(out / "generated.json", records)
    return records


def _generate_pending(
    cfg: EvalConfig,
    specs: Sequence[CheckpointSpec],
    pending: dict[str, list[_Job]],
    device: str,
    dtype: torch.dtype,
    total: int,
    callback: ProgressCallback | None,
    on_batch: Callable[[str, int], None] | None,
) -> None:
    from lyco_trainer.models import load_base

    base: Any = None
    done = 0
    n_batches = sum(math.ceil(len(v) / cfg.generation.batch_size) for v in pending.values())

    def report(n: int) -> None:
        nonlocal done
        done += n
        if callback is not None:
            callback(done, total)

    def work() -> Iterator[tuple[CheckpointSpec, list[_Job]]]:
        for spec in specs:
            for batch in _batches(pending.get(spec.id, []), cfg.generation.batch_size):
                yield spec, batch

    current: tuple[str, Any, Any] | None = None  # (checkpoint id, models, pipeline) with its adapter applied
    stack = contextlib.ExitStack()
    try:
        for spec, batch in progress(work(), total=n_batches, desc="generate", unit="batch"):
            if current is None or current[0] != spec.id:
                stack.close()
                stack = contextlib.ExitStack()
                if spec.kind == "model":
                    assert spec.path is not None
                    models = load_base(ModelConfig(base=Path(spec.path)), device=device, dtype=dtype)
                else:
                    if base is None:
                        base = load_base(cfg.model, device=device, dtype=dtype)
                    models = base
                stack.enter_context(_adapter(models, spec, device, dtype))
                current = (spec.id, models, build_pipeline(models, cfg.generation.scheduler))
            images = _run_batch(current[2], batch, cfg)
            for job, im in zip(batch, images):
                _save_png(im, job.path, job, spec, cfg)
            if on_batch is not None:
                on_batch(spec.id, len(batch))
            report(len(batch))
    finally:
        stack.close()


def _write_index(path: Path, records: Sequence[GeneratedImage]) -> None:
    doc = [r.model_dump(mode="json") for r in records]
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(doc, indent=1))


def read_index(out_dir: str | Path) -> list[GeneratedImage]:
    """The records of the last :func:`generate` call on ``out_dir`` (``generated.json``)."""
    path = Path(out_dir) / "generated.json"
    try:
        doc = json.loads(path.read_text())
        return [GeneratedImage.model_validate(d) for d in doc]
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no generation index (run generate first)") from None
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: not a generation index ({type(e).__name__})") from None


__all__ = [
    "BASE_ID",
    "GeneratedImage",
    "HashCache",
    "base_identity",
    "build_pipeline",
    "checkpoint_identity",
    "generate",
    "image_key",
    "read_index",
    "resolve_dtype",
    "settings_of",
]
