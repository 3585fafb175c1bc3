"""What a run writes: adapter files with complete metadata, or for ``native`` a full diffusers pipeline.

File names in ``output.dir`` (sd-scripts' convention): ``<name>-<epoch:06d>.safetensors`` every N epochs,
``<name>-step<step:08d>.safetensors`` every N steps, ``<name>.safetensors`` at the end. ``native`` runs write
diffusers pipeline folders with the same names minus the suffix (``<name>/`` at the end).

Adapter metadata (:class:`lyco_core.formats.metadata.AdapterMetadata`) carries the training facts sd-scripts
records as ``ss_*`` keys: steps, epochs, learning rates, optimiser, scheduler, seed, batch size, resolution,
tag frequencies, dataset folders with repeats and image counts, number of training images, mixed precision,
noise offset, min-SNR γ, start/finish times, and the base model's family, prediction type, name and hash.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lyco_core.formats.metadata import AdapterMetadata, BaseModelInfo, TrainingInfo
from lyco_core.formats.safetensors_io import atomic_output_dir

from .config import TrainConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def adapter_path(cfg: TrainConfig, *, epoch: int | None = None, step: int | None = None) -> Path:
    """The output file for a save at ``epoch`` / ``step``; the final file when both are None."""
    native = cfg.network.algo == "native"
    suffix = "" if native else ".safetensors"
    if epoch is not None:
        stem = f"{cfg.output.name}-{epoch:06d}"
    elif step is not None:
        stem = f"{cfg.output.name}-step{step:08d}"
    else:
        stem = cfg.output.name
    return Path(cfg.output.dir) / f"{stem}{suffix}"


def tag_frequency(dataset: Any) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per concept folder, how often each comma-separated caption tag occurs (captions as
    found on disk, before shuffling/dropout; images without a caption count their concept's descriptor)."""
    out: dict[str, Counter[str]] = {}
    for item in dataset.items:
        caption = item.caption if item.caption else descriptor(item.concept)
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        out.setdefault(item.concept.name, Counter()).update(tags)
    return {k: dict(v) for k, v in out.items()}


def descriptor(concept: Any) -> str:
    """The concept's "[V] class" descriptor (trigger word, then the optional class word)."""
    words = [w for w in (getattr(concept, "trigger", None), getattr(concept, "class_word", None)) if w]
    return " ".join(words) or concept.name


def dataset_dirs(dataset: Any) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs``: per concept folder ``{"n_repeats", "img_count"}`` (repeats after balancing)."""
    counts = Counter(item.concept.name for item in dataset.items)
    return {
        c.name: {"n_repeats": int(c.repeats), "img_count": int(counts.get(c.name, 0))} for c in dataset.concepts
    }


@dataclass
class RunFacts:
    """What the loop knows about the run when it saves (fills :class:`TrainingInfo`)."""

    step: int
    epoch: int
    total_steps: int
    num_train_images: int
    started_at: float
    optimizer: str


def optimizer_label(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> str:
    """``ss_optimizer`` as sd-scripts writes it: the class path and the non-default arguments."""
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__name__}(weight_decay={cfg.optimizer.weight_decay},betas={cfg.optimizer.betas})"


def build_metadata(cfg: TrainConfig, dataset: Any, models: Any, facts: RunFacts, *, final: bool) -> AdapterMetadata:
    """The adapter's metadata for a save at ``facts.step`` (``final``: the end of the run)."""
    t = cfg.train
    training = TrainingInfo(
        steps=facts.step,
        epochs=facts.epoch,
        max_train_steps=facts.total_steps,
        num_epochs=t.epochs,
        learning_rate=t.unet_lr,
        unet_lr=t.unet_lr,
        text_encoder_lr=t.text_encoder_lr if cfg.network.train_text_encoder else None,
        lr_scheduler=cfg.scheduler.name,
        lr_warmup_steps=cfg.scheduler.warmup_steps,
        optimizer=facts.optimizer,
        seed=t.seed,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation,
        num_train_images=facts.num_train_images,
        num_reg_images=0,
        resolution=(cfg.data.resolution, cfg.data.resolution),
        mixed_precision=t.mixed_precision,
        noise_offset=t.noise_offset,
        min_snr_gamma=t.min_snr_gamma,
        started_at=facts.started_at,
        finished_at=time.time() if final else None,
        tag_frequency=tag_frequency(dataset),
        dataset_dirs=dataset_dirs(dataset),
        dataset=_dataset_summary(dataset, cfg),
        extra={"max_grad_norm": t.max_grad_norm, "gradient_checkpointing": t.gradient_checkpointing},
    )
    base = BaseModelInfo(
        family=models.family,
        prediction_type=models.prediction,
        model_name=Path(cfg.model.base).name,
        model_hash=getattr(models, "model_hash", None),
    )
    triggers = sorted({c.trigger for c in dataset.concepts if getattr(c, "trigger", None)})
    return AdapterMetadata(
        base=base,
        training=training,
        output_name=cfg.output.name,
        trigger_phrase=", ".join(triggers) or None,
    )


def _dataset_summary(dataset: Any, cfg: TrainConfig) -> dict[str, Any]:
    report = getattr(dataset, "report", None)
    out: dict[str, Any] = {
        "resolution": cfg.data.resolution,
        "buckets": cfg.data.buckets,
        "balance": cfg.data.balance,
        "concepts": {
            c.name: {k: getattr(c, k, None) for k in ("category", "class_name", "subclass", "trigger", "class_word")}
            for c in dataset.concepts
        },
    }
    if report is not None and hasattr(report, "model_dump"):
        out["report"] = report.model_dump(mode="json")
    return out


def save_adapter(network: Any, path: Path, cfg: TrainConfig, metadata: AdapterMetadata, family: str) -> Path:
    """Write the adapter file (atomic; replaces a file of the same name from this run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(
        network.save(path, dtype=DTYPES[cfg.output.dtype], metadata=metadata, base_family=family, overwrite=True)
    )


def save_native(models: Any, path: Path, cfg: TrainConfig, metadata: AdapterMetadata) -> Path:
    """Write a full diffusers pipeline folder (the fine-tuned UNet and text encoders, the base's VAE, tokenizers
    and scheduler config) that ``StableDiffusion[XL]Pipeline.from_pretrained`` loads; atomic; the run's facts go
    to ``lyco_training.json`` inside it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = DTYPES[cfg.output.dtype]
    te = models.text_encoders
    tok = models.tokenizers
    if models.family == "sdxl":
        pipe: Any = StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=te[0], text_encoder_2=te[1], tokenizer=tok[0], tokenizer_2=tok[1],
            unet=models.unet, scheduler=models.scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=models.vae, text_encoder=te[0], tokenizer=tok[0], unet=models.unet, scheduler=models.scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(path, overwrite=True) as tmp:
        # save a copy in the output dtype without touching the training weights
        for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
            module = getattr(pipe, name, None)
            if module is None:
                continue
            sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in
                  module.state_dict().items()}
            module.save_pretrained(str(tmp / name), state_dict=sd, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2", "scheduler"):
            part = getattr(pipe, name, None)
            if part is not None:
                part.save_pretrained(str(tmp / name))
        pipe.save_config(str(tmp))
        (tmp / "lyco_training.json").write_text(metadata.model_dump_json(indent=1, exclude_none=True))
    return path


__all__ = [
    "DTYPES",
    "RunFacts",
    "adapter_path",
    "build_metadata",
    "dataset_dirs",
    "descriptor",
    "optimizer_label",
    "save_adapter",
    "save_native",
    "tag_frequency",
]
