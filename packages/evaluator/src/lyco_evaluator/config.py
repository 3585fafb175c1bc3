"""The evaluation configuration (``lyco eval CONFIG.toml``): one pydantic model per TOML table.

Tables: ``[model]`` (the base, as in a training config), ``[[checkpoints]]`` (adapters or fine-tuned pipeline
folders, each at one or more strengths, with the facts the SHAP analysis uses), ``[data]`` (the training dataset:
the same table as a training config, so it can be copied over), ``[prompts]``, ``[generation]``, ``[encoders]``,
``[metrics]``, ``[report]`` and ``[output]``. ``--set key=value`` overrides any field by its dotted path
(``generation.steps=10``, ``prompts.n_images=100``); values are TOML scalars/arrays, else plain strings. Unknown
keys anywhere are errors naming the key (``extra="forbid"``). Paths in the file are relative to the file's folder.

A minimal config::

    [model]
    base = "models/sd15"
    [[checkpoints]]
    path = "out/my_lokr-000010.safetensors"
    algo = "lokr"
    [data]
    root = "dataset"
    [prompts]
    n_images = 100          # per (sub)class and prompt type, as in the paper
    [encoders]
    dinov2 = "weights/dinov2-large"
    clip = "weights/clip-vit-l-14"
    vgg19 = "weights/vgg19-dcbb9e9d.pth"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyco_core.configfile import apply_overrides, read_toml, validate
from lyco_core.errors import InvalidConfigError, NotFoundError
from lyco_trainer.config import DataConfig, ModelConfig, resolve_model_data_paths, under

PromptType = Literal["train", "trigger", "alter", "style", "agnostic", "agnostic_class"]
PROMPT_TYPES: tuple[PromptType, ...] = ("train", "trigger", "alter", "style", "agnostic", "agnostic_class")
MetricName = Literal[
    "image_similarity", "scd", "text_similarity", "vendi", "style_loss", "style_loss_dataset", "frechet"
]
PAPER_PROMPT_TYPES: tuple[PromptType, ...] = ("train", "trigger", "alter", "style")
PAPER_METRICS: tuple[MetricName, ...] = ("image_similarity", "scd", "text_similarity", "vendi", "style_loss")
EncoderKind = Literal["dinov2", "clip", "vgg19"]
#: which encoder each metric needs
METRIC_ENCODERS: dict[str, EncoderKind] = {
    "image_similarity": "dinov2",
    "scd": "dinov2",
    "vendi": "dinov2",
    "frechet": "dinov2",
    "text_similarity": "clip",
    "style_loss": "vgg19",
    "style_loss_dataset": "vgg19",
}
#: the checkpoint id of the base model's own images (the preservation reference)
BASE_ID = "base"
_EPOCH_STEM = re.compile(r"-(\d{6})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CheckpointConfig(_Strict):
    """One ``[[checkpoints]]`` entry: a file (or folder) to evaluate and what is known about how it was trained."""

    path: Path = Field(
        description="an adapter .safetensors, a folder of them (each one a checkpoint), or a diffusers pipeline "
        "folder (a full fine-tune, e.g. trainer 'native' output)"
    )
    name: str | None = Field(None, description="id in tables and plots; default: the file stem")
    strength: float = Field(1.0, description="adapter multiplier")
    strengths: list[float] | None = Field(None, min_length=1, description="several strengths (one checkpoint each)")
    algo: str | None = Field(None, description="for the SHAP analysis; default: the file's Lyco metadata")
    preset: str | None = Field(None, description="trained layers, e.g. attn-only / attn-mlp / full")
    epoch: int | None = Field(None, ge=0, description="default: metadata, else a -NNNNNN file-name suffix")
    capacity: float | None = Field(None, description="ordinal capacity level (paper: 1-4)")
    lr_level: int | None = Field(None, description="learning-rate level (paper: 1-3)")
    group: str | None = Field(None, description="training config id shared by runs that differ only by seed")
    train_seed: int | None = Field(None, description="training seed of this run (paper: seeds a/b/c)")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or v == BASE_ID or "/" in v or "\\" in v):
            raise ValueError(f"{v!r} is not a usable checkpoint name ('{BASE_ID}' is reserved; no slashes)")
        return v


class CheckpointSpec(BaseModel):
    """One checkpoint as generation sees it: a single strength, a unique ``id``.

    ``kind``: ``adapter`` (a Lyco/kohya/LyCORIS file applied to the base at ``strength``), ``model`` (a diffusers
    pipeline folder used instead of the base) or ``base`` (the base alone, id ``"base"``).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    kind: Literal["adapter", "model", "base"] = "adapter"
    path: Path | None = None
    strength: float = 1.0
    algo: str | None = None
    preset: str | None = None
    epoch: int | None = None
    capacity: float | None = None
    lr_level: int | None = None
    group: str | None = None
    train_seed: int | None = None

    def factors(self) -> dict[str, Any]:
        """The SHAP factors (algo, preset, epoch, capacity, lr_level) and grouping facts of this checkpoint."""
        return {k: getattr(self, k) for k in ("algo", "preset", "epoch", "capacity", "lr_level", "group",
                                               "train_seed", "strength")}


class PromptsConfig(_Strict):
    """Which prompts are generated (paper §4.1, §5.2) and how many images per (sub)class and prompt type."""

    types: list[PromptType] = Field(
        default_factory=lambda: list(PAPER_PROMPT_TYPES),
        min_length=1,
        description="train, trigger, alter, style (the paper's four), agnostic, agnostic_class (concept leak)",
    )
    n_images: int = Field(4, ge=1, description="images per (sub)class and prompt type (paper: 100)")
    templates: Path | None = Field(
        None, description="a folder whose files replace the shipped ones of the same name (alter/<name>.txt, "
        "style.txt, agnostic.txt)"
    )
    categories: dict[str, str] = Field(
        default_factory=dict, description="dataset category → alter template name (e.g. stuffed_toy = 'object')"
    )
    default_template: str = Field("generic", description="alter template of concepts whose category has none")
    subclass_in_trigger: bool = Field(
        True, description="append the sub-class folder name to the descriptor (paper: 'fck man, afro, realistic')"
    )
    style_for_styles: bool = Field(False, description="also generate <style> prompts for style concepts")
    text_map: dict[str, str] = Field(
        default_factory=dict,
        description="trigger word → replacement noun for CLIP text similarity (e.g. lun = 'lobster'); "
        "triggers not listed are removed from the text",
    )


class GenerationConfig(_Strict):
    """Image generation (paper: DDIM, 25 steps, CFG 7, 512×512, empty negative prompt, seeds from 1000)."""

    scheduler: Literal["ddim", "euler_a"] = Field("ddim", description="euler_a: the appendix's 'Euler a'")
    steps: int = Field(25, ge=1)
    guidance: float = Field(7.0, ge=0.0)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    negative_prompt: str = ""
    seed: int = Field(1000, ge=0, description="first seed of every (sub)class × prompt type")
    batch_size: int = Field(4, ge=1, description="images per pipeline call")
    device: str = Field("auto", description="auto: cuda when available, else cpu")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto: fp16 on cuda, fp32 on cpu")
    base_reference: bool = Field(True, description="also generate the base model alone (id 'base')")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"{v} is not a multiple of 8")
        return v


class EncodersConfig(_Strict):
    """Feature extractors from local weights (nothing is downloaded)."""

    tiny: bool = Field(False, description="tiny random encoders built from configs (tests, the demo)")
    dinov2: Path | None = Field(None, description="transformers Dinov2Model folder (e.g. facebook/dinov2-large)")
    clip: Path | None = Field(None, description="transformers CLIPModel folder, or an open_clip checkpoint file")
    open_clip_model: str = Field("ViT-L-14", description="open_clip architecture of a checkpoint file")
    vgg19: Path | None = Field(None, description="torchvision vgg19 state dict (vgg19-dcbb9e9d.pth)")
    batch_size: int = Field(16, ge=1)
    device: str = Field("auto", description="auto: cuda when available, else cpu")


class MetricsConfig(_Strict):
    """Which metrics are computed (paper §5.2) and the optional analyses."""

    enabled: list[MetricName] = Field(
        default_factory=lambda: list(PAPER_METRICS),
        description="image_similarity, scd, text_similarity, vendi, style_loss (the paper's main set), "
        "style_loss_dataset, frechet",
    )
    reference_mode: Literal["padding", "resize", "crop"] = Field(
        "padding", description="preprocessing of dataset images (paper: padding)"
    )
    shap: bool = Field(False, description="SHAP analysis with CatBoost (needs the evaluator's [shap] extra)")


class ReportConfig(_Strict):
    html: bool = True
    grid_images: int = Field(4, ge=1, description="images per prompt type in the report's grids")


class OutputConfig(_Strict):
    dir: Path = Field(Path("eval"), description="results, report and the image/feature caches")


class EvalConfig(_Strict):
    """Everything ``lyco eval`` needs."""

    model: ModelConfig
    checkpoints: list[CheckpointConfig] = Field(default_factory=list)
    data: DataConfig
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    encoders: EncodersConfig = Field(default_factory=EncodersConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _encoders_given(self) -> EvalConfig:
        if self.encoders.tiny:
            return self
        for metric in self.metrics.enabled:
            kind = METRIC_ENCODERS[metric]
            if getattr(self.encoders, kind) is None:
                raise ValueError(
                    f"encoders.{kind} is needed by metric {metric!r} (give a local path, set encoders.tiny = true "
                    f"or remove it from metrics.enabled)"
                )
        return self

    def resolved_device(self, which: str | None = None) -> str:
        """``generation.device`` (or ``which``) with ``auto`` resolved: ``cuda`` when available, else ``cpu``."""
        import torch

        dev = self.generation.device if which is None else which
        if dev == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return dev


# --------------------------------------------------------------------------------------------- loading
def _resolve_paths(cfg: EvalConfig, root: Path) -> EvalConfig:
    resolve_model_data_paths(cfg.model, cfg.data, root)
    for ck in cfg.checkpoints:
        ck.path = under(root, ck.path) or ck.path
    cfg.prompts.templates = under(root, cfg.prompts.templates)
    cfg.encoders.dinov2 = under(root, cfg.encoders.dinov2)
    cfg.encoders.clip = under(root, cfg.encoders.clip)
    cfg.encoders.vgg19 = under(root, cfg.encoders.vgg19)
    cfg.output.dir = under(root, cfg.output.dir) or cfg.output.dir
    return cfg


def parse_config(doc: dict[str, Any], source: str = "config", root: Path | None = None) -> EvalConfig:
    """Validate a config dict; errors are one line naming the key. Relative paths are taken from ``root``."""
    cfg = validate(EvalConfig, doc, source)
    return _resolve_paths(cfg, root) if root is not None else cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """Read ``path`` (TOML), apply ``--set`` overrides (``["generation.steps=10", …]``), validate."""
    p = Path(path)
    return parse_config(apply_overrides(read_toml(p), overrides or []), str(p), p.parent)


# --------------------------------------------------------------------------------------------- checkpoints
def _is_pipeline_folder(path: Path) -> bool:
    return (path / "unet").is_dir() and (path / "model_index.json").is_file()


def _file_facts(path: Path) -> dict[str, Any]:
    """algo / preset / epoch from an adapter file's metadata (Lyco schema, else sd-scripts' ss_* keys)."""
    from lyco_core.errors import LycoError
    from lyco_core.formats.metadata import read_metadata
    from lyco_core.formats.safetensors_io import read_header

    facts: dict[str, Any] = {}
    m = _EPOCH_STEM.search(path.stem)
    if m:
        facts["epoch"] = int(m.group(1))
    if path.suffix.lower() != ".safetensors":
        return facts
    try:
        meta = read_metadata(read_header(path).metadata, source=str(path))
    except LycoError:
        return facts  # a bad header is reported by the loader, with its own message
    if meta.lyco is not None:
        facts["algo"] = meta.lyco.network.algo
        if meta.lyco.network.preset:
            facts["preset"] = meta.lyco.network.preset
        if meta.lyco.training is not None and meta.lyco.training.epochs is not None:
            facts["epoch"] = meta.lyco.training.epochs
    elif "ss_epoch" in meta.kohya and meta.kohya["ss_epoch"].isdigit():
        facts["epoch"] = int(meta.kohya["ss_epoch"])
    return facts


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    taken.add(out)
    return out


def expand_checkpoints(cfg: EvalConfig) -> list[CheckpointSpec]:
    """The ``[[checkpoints]]`` as :class:`CheckpointSpec` s: folders of adapters listed (sorted by name), one spec
    per strength (id ``name@strength`` when a checkpoint has several), missing facts read from file metadata.

    Reads only the file system. Raises NotFoundError naming ``checkpoints[i].path`` for a missing path or a
    folder without adapters.
    """
    out: list[CheckpointSpec] = []
    taken: set[str] = {BASE_ID}
    for i, ck in enumerate(cfg.checkpoints):
        key = f"checkpoints[{i}].path"
        path = Path(ck.path)
        if not path.exists():
            raise NotFoundError(f"{key}: no such file or folder: {path}")
        files: list[tuple[Path, str, Literal["adapter", "model"]]]
        if path.is_dir() and _is_pipeline_folder(path):
            files = [(path, ck.name or path.name, "model")]
        elif path.is_dir():
            found = sorted(p for p in path.glob("*.safetensors") if p.is_file())
            if not found:
                raise NotFoundError(f"{key}: no .safetensors adapters (nor a diffusers pipeline) in {path}")
            files = [(p, f"{ck.name}-{p.stem}" if ck.name else p.stem, "adapter") for p in found]
        else:
            files = [(path, ck.name or path.stem, "adapter")]
        strengths = ck.strengths if ck.strengths is not None else [ck.strength]
        for file, name, kind in files:
            if kind == "model" and strengths != [1.0]:
                raise InvalidConfigError(f"checkpoints[{i}].strength: a pipeline folder runs at strength 1 only")
            facts = _file_facts(file) if kind == "adapter" else {}
            given = {k: getattr(ck, k) for k in ("algo", "preset", "epoch", "capacity", "lr_level", "group",
                                                  "train_seed")}
            merged = {k: (v if v is not None else facts.get(k)) for k, v in given.items()}
            if kind == "model" and merged["algo"] is None:
                merged["algo"] = "full"
            for s in strengths:
                ident = f"{name}@{s:g}" if len(strengths) > 1 else name
                out.append(CheckpointSpec(id=_unique(ident, taken), kind=kind, path=file, strength=s, **merged))
    return out


def base_checkpoint() -> CheckpointSpec:
    """The base model alone: the preservation reference (id ``"base"``)."""
    return CheckpointSpec(id=BASE_ID, kind="base", path=None, strength=0.0)
