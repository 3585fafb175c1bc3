"""The training configuration: one pydantic model per TOML table, validated before anything is loaded.

A config is a TOML file (``lyco train CONFIG.toml``) whose tables are the fields of :class:`TrainConfig`.
``--set key=value`` overrides any field by its dotted path (``train.epochs=3``, ``network.options.factor=8``);
values are parsed as TOML scalars/arrays (``--set data.resolution=768``, ``--set sample.prompts=["a", "b"]``),
falling back to a plain string. Unknown keys anywhere are errors that name the key (``extra="forbid"``).

Paths in the file are relative to the file's own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyco_core.configfile import apply_overrides, read_toml, validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The base model to fine-tune."""

    base: Path = Field(description="diffusers folder (pipeline) or single-file checkpoint (.safetensors/.ckpt)")
    family: Literal["auto", "sd1", "sd2", "sdxl"] = Field("auto", description="auto: read from the checkpoint")
    prediction: Literal["auto", "epsilon", "v"] = Field(
        "auto", description="auto: the scheduler config of a diffusers folder, else epsilon (SD 2.x 768-v: v)"
    )
    vae: Path | None = Field(None, description="a separate VAE (diffusers folder or .safetensors)")
    tokenizer: Path | None = Field(
        None, description="tokenizer folder(s) for a single-file base (CLIP vocab files cannot be downloaded here)"
    )
    config_dir: Path | None = Field(
        None, description="a diffusers folder whose component configs describe a single-file base of non-standard size"
    )


class NetworkSection(_Strict):
    """The adapter: any Lyco algorithm and preset (``native`` = full fine-tuning, the paper's "Native")."""

    algo: str = "lora"
    preset: str = Field("attn-mlp", description="built-in preset name or a path to a preset TOML")
    dim: int = Field(8, ge=1)
    alpha: float = 4.0
    conv_dim: int | None = Field(None, ge=1)
    conv_alpha: float | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="other lyco_core AdapterOptions fields")
    train_text_encoder: bool = False


class ConceptConfig(_Strict):
    """One concept folder (paper §5.1): images with same-name captions, a descriptor and repeats."""

    path: Path
    trigger: str | None = Field(None, description="the trigger word [V]; default: the folder name")
    class_word: str | None = Field(None, description="optional class word, put after the trigger")
    repeats: int = Field(1, ge=1)


class DataConfig(_Strict):
    """Images, captions and how they become batches."""

    root: Path | None = Field(
        None, description="a folder tree category/class[/sub-class]/images; every leaf folder is a concept"
    )
    concepts: list[ConceptConfig] = Field(default_factory=list, description="explicit concept folders")
    caption_extension: str = ".txt"
    resolution: int = Field(512, ge=8)
    buckets: bool = True
    bucket_min: int = Field(256, ge=8)
    bucket_max: int = Field(1024, ge=8)
    bucket_step: int = Field(64, ge=8)
    balance: bool = Field(True, description="repeat images so every class is seen equally often per epoch")
    shuffle_tags: bool = False
    keep_tokens: int = Field(1, ge=0, description="leading tags kept in place when shuffling")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability of an empty caption")
    tag_dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability of dropping each tag")
    prefix: str = ""
    suffix: str = ""
    cache_latents: Literal["memory", "disk", "none"] = "memory"
    cache_text: bool = Field(True, description="cache text-encoder outputs when the text encoder is frozen")

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if self.root is None and not self.concepts:
            raise ValueError("give data.root or at least one [[data.concepts]]")
        if self.bucket_min > self.bucket_max:
            raise ValueError(f"bucket_min {self.bucket_min} > bucket_max {self.bucket_max}")
        return self


class OptimizerConfig(_Strict):
    name: Literal["adamw", "adamw8bit", "lion", "prodigy"] = "adamw"
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class SchedulerConfig(_Strict):
    name: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class TrainSection(_Strict):
    """The loop's hyper-parameters."""

    batch_size: int = Field(1, ge=1)
    epochs: int = Field(10, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    gradient_accumulation: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    unet_lr: float = Field(1e-4, gt=0)
    text_encoder_lr: float = Field(5e-5, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    noise_offset: float = Field(0.0, ge=0.0)
    min_snr_gamma: float | None = Field(None, gt=0)
    device: str = Field("auto", description="auto: cuda when available, else cpu")


class OutputConfig(_Strict):
    dir: Path = Path("output")
    name: str = "lyco"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    save_every_epochs: int | None = Field(1, ge=1)
    save_every_steps: int | None = Field(None, ge=1)
    state_every_steps: int | None = Field(None, ge=1, description="write a resumable state every N steps")
    keep_states: int = Field(2, ge=1)
    tensorboard: bool = True


class SampleConfig(_Strict):
    prompts: list[str] = Field(default_factory=list)
    every_epochs: int | None = Field(1, ge=1)
    steps: int = Field(20, ge=1)
    guidance: float = 7.0
    width: int | None = None
    height: int | None = None
    seed: int = 0


class TrainConfig(_Strict):
    """Everything ``lyco train`` needs; see the package README for an annotated example."""

    model: ModelConfig
    network: NetworkSection = Field(default_factory=NetworkSection)
    data: DataConfig
    train: TrainSection = Field(default_factory=TrainSection)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @field_validator("network")
    @classmethod
    def _known_algorithm(cls, v: NetworkSection) -> NetworkSection:
        from lyco_core import algorithms

        if v.algo != "native":
            algorithms.get(v.algo)  # raises naming the algorithm
        return v


def under(root: Path, p: Path | None) -> Path | None:
    """``p`` taken relative to ``root`` (the config file's folder) unless it is absolute or None."""
    return None if p is None or p.is_absolute() else root / p


def resolve_model_data_paths(model: ModelConfig, data: DataConfig, root: Path) -> None:
    """Make the relative paths of the ``[model]`` and ``[data]`` tables relative to ``root``, in place (the
    trainer's and the evaluator's configs share both tables)."""
    model.base = under(root, model.base) or model.base
    model.vae = under(root, model.vae)
    model.tokenizer = under(root, model.tokenizer)
    model.config_dir = under(root, model.config_dir)
    data.root = under(root, data.root)
    for c in data.concepts:
        c.path = under(root, c.path) or c.path


def _resolve_paths(cfg: TrainConfig, root: Path) -> TrainConfig:
    resolve_model_data_paths(cfg.model, cfg.data, root)
    cfg.output.dir = under(root, cfg.output.dir) or cfg.output.dir
    return cfg


def parse_config(doc: dict[str, Any], source: str = "config", root: Path | None = None) -> TrainConfig:
    """Validate a config dict; errors are one line naming the key. Relative paths are taken from ``root``."""
    cfg = validate(TrainConfig, doc, source)
    return _resolve_paths(cfg, root) if root is not None else cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read ``path`` (TOML), apply ``--set`` overrides, validate."""
    p = Path(path)
    return parse_config(apply_overrides(read_toml(p), overrides or []), str(p), p.parent)
