"""Loading the base model to train on: a local diffusers pipeline folder or an LDM single-file checkpoint.

Nothing is downloaded. A folder is loaded component by component with ``from_pretrained(..., local_files_only=True)``.
A single file (``.safetensors``, or ``.ckpt`` read with ``torch.load(weights_only=True)``) is built from the
architecture configs shipped in ``lyco_trainer/configs/<family>/`` (SD 1.5, SD 2.1, SDXL base 1.0) — or from the
configs of a diffusers folder given as ``config_dir`` (used for non-standard sizes such as the tiny test
pipelines) — and its weights are converted with diffusers' offline converters
(:mod:`diffusers.loaders.single_file_utils`). CLIP vocabularies cannot be shipped, so a single file needs
``model.tokenizer``.

Decisions (documented here because several places depend on them):

* family — ``model.family`` when set (it must agree with a released cross-attention width), else read: for a folder
  from the UNet config (``addition_embed_type == "text_time"`` or a ``text_encoder_2`` → sdxl; cross-attention
  width 768 → sd1, 1024 → sd2, 2048 → sdxl; any other width (tiny models) → sd1), for a single file from
  :func:`lyco_core.checkpoint.open_base` (cross-attention width, then structure).
* prediction — ``model.prediction`` when set, else the scheduler config's ``prediction_type`` (the folder's own, or
  for a single file the shipped one of its family: SD 2.1's is ``v_prediction``, which is wrong for the 512 px
  SD 2.x base models, hence a warning), else epsilon.
* model_hash — sha256 of the whole file for a single file (= kohya's ``ss_new_sd_model_hash``); for a folder the
  sha256 of the UNet weight file (``unet/diffusion_pytorch_model[.variant].safetensors``; for sharded UNets, of
  the shard files' bytes concatenated in name order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lyco_core.errors import (
    CorruptFileError,
    IncompatibleBaseError,
    InvalidConfigError,
    NotFoundError,
    UnknownFormatError,
)

from ..config import ModelConfig

Family = Literal["sd1", "sd2", "sdxl"]
Prediction = Literal["epsilon", "v"]

#: The folder of the shipped architecture configs (``<family>/unet.json`` …).
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
WIDTH_FAMILY: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_PRED: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v", "v": "v"}


@dataclass
class BaseModels:
    """A loaded base: the modules (in eval mode, on ``device``/``dtype``), the training scheduler and facts about it.

    ``text_encoders`` / ``tokenizers``: one each for SD 1.x/2.x, two for SDXL (CLIP-L, then OpenCLIP-bigG with its
    projection). ``scheduler``: a :class:`diffusers.DDPMScheduler` with the base's betas and ``prediction_type``
    ("epsilon" or "v_prediction" as ``prediction`` says).
    """

    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler: Any
    family: Family
    prediction: Prediction
    model_hash: str | None
    source: Path | None = None
    kind: str = "diffusers-folder"  # or "single-file"
    warnings: list[str] = field(default_factory=list)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for the released VAEs and the tiny ones)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))


# ------------------------------------------------------------------------------------------------ helpers
def file_sha256(paths: list[Path]) -> str:
    """sha256 of the files' bytes, concatenated in the given order (1 MiB reads)."""
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return doc


def shipped_config(family: str, component: str) -> dict[str, Any]:
    """A shipped architecture config (``component``: unet, vae, text_encoder, text_encoder_2, scheduler)."""
    path = CONFIGS / family / f"{component}.json"
    if not path.is_file():
        raise NotFoundError(f"{path}: no shipped {component} config for family {family!r}")
    return {k: v for k, v in _read_json(path).items() if k != "_note"}


def family_from_unet_config(config: Mapping[str, Any], has_te2: bool = False) -> tuple[Family, bool]:
    """(family, whether it is certain: SDXL structure or a released width) from a diffusers UNet config."""
    width = config.get("cross_attention_dim")
    if config.get("addition_embed_type") == "text_time" or has_te2:
        return "sdxl", True  # the size conditioning / second encoder is SDXL's structure at any width
    if isinstance(width, int) and width in WIDTH_FAMILY:
        return WIDTH_FAMILY[width], True
    return "sd1", False


def _check_family(cfg: ModelConfig, detected: Family, certain: bool, where: Path) -> Family:
    if cfg.family == "auto":
        return detected
    if certain and cfg.family != detected:
        raise IncompatibleBaseError(f"{where}: model.family is {cfg.family!r} but the base is {detected}")
    return cfg.family  # type: ignore[return-value]


def _prediction(cfg: ModelConfig, sched_cfg: Mapping[str, Any], where: Path) -> Prediction:
    if cfg.prediction != "auto":
        return cfg.prediction
    pt = str(sched_cfg.get("prediction_type") or "epsilon")
    if pt not in _PRED:
        raise UnknownFormatError(f"{where}: scheduler prediction_type {pt!r} is not supported; set model.prediction")
    return _PRED[pt]


def _ddpm(sched_cfg: Mapping[str, Any], prediction: Prediction) -> Any:
    from diffusers import DDPMScheduler

    keep = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    keep["prediction_type"] = "v_prediction" if prediction == "v" else "epsilon"
    keep.pop("steps_offset", None)
    return DDPMScheduler.from_config(keep)


def _finish(module: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    module.requires_grad_(False)
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module.eval()


def _variant(folder: Path) -> str | None:
    """``fp16`` when a model folder has only ``*.fp16.safetensors`` weights, else None."""
    if any(p for p in folder.glob("*.safetensors") if len(p.suffixes) == 1):
        return None
    return "fp16" if any(folder.glob("*.fp16.safetensors")) else None


def _from_pretrained(cls: Any, folder: Path, what: str, **kw: Any) -> Any:
    if not folder.is_dir():
        raise NotFoundError(f"{folder}: no {what} folder")
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        msg = " ".join(str(e).split())[:240]
        raise CorruptFileError(f"{folder}: cannot load the {what}: {msg}") from None


def _load_tokenizer(folder: Path, what: str, pad_token: str | None = None) -> Any:
    from transformers import CLIPTokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise NotFoundError(f"{folder}: no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json) for {what}")
    kw = {"pad_token": pad_token} if pad_token else {}
    return _from_pretrained(CLIPTokenizer, folder, what, **kw)


# ------------------------------------------------------------------------------------------------ VAE
def _vae_config(base_folder: Path | None, family: Family, config_dir: Path | None) -> dict[str, Any]:
    for root in (config_dir, base_folder):
        if root is not None and (root / "vae" / "config.json").is_file():
            return {k: v for k, v in _read_json(root / "vae" / "config.json").items() if not k.startswith("_")}
    return shipped_config(family, "vae")


def vae_from_state_dict(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: Path) -> Any:
    """An AutoencoderKL from a VAE state dict in diffusers naming or LDM naming (``first_stage_model.``, ``vae.``,
    or bare ``encoder.down.0…``)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = any(k.startswith(("first_stage_model.", "vae.", "encoder.down.", "decoder.up.")) for k in sd)
    conv = convert_ldm_vae_checkpoint(dict(sd), dict(config)) if ldm else dict(sd)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(config))
    return _assign(vae, conv, where, "VAE")


def _load_vae_override(path: Path, family: Family, base_folder: Path | None, config_dir: Path | None) -> Any:
    from diffusers import AutoencoderKL

    if not path.exists():
        raise NotFoundError(f"{path}: no such VAE (model.vae)")
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return _from_pretrained(AutoencoderKL, sub, "VAE (model.vae)", variant=_variant(sub))
    return vae_from_state_dict(_load_state_dict(path), _vae_config(base_folder, family, config_dir), path)


# ------------------------------------------------------------------------------------------------ folders
def _load_folder(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 config_dir: Path | None) -> BaseModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = cfg.base
    if not (base / "unet").is_dir():
        raise UnknownFormatError(f"{base}: not a diffusers pipeline folder (no unet/ subfolder)")
    has_te2 = (base / "text_encoder_2").is_dir()
    unet_cfg = _read_json(base / "unet" / "config.json") if (base / "unet" / "config.json").is_file() else {}
    detected, certain = family_from_unet_config(unet_cfg, has_te2)
    family = _check_family(cfg, detected, certain, base)
    warnings: list[str] = []

    unet_dir = base / "unet"
    unet_variant = _variant(unet_dir)
    unet = _from_pretrained(UNet2DConditionModel, unet_dir, "UNet", variant=unet_variant)
    if cfg.vae is not None:
        vae = _load_vae_override(cfg.vae, family, base, config_dir)
    else:
        vae = _from_pretrained(AutoencoderKL, base / "vae", "VAE", variant=_variant(base / "vae"))
    te_dir = base / "text_encoder"
    text_encoders = [_from_pretrained(CLIPTextModel, te_dir, "text encoder", variant=_variant(te_dir))]
    tok_root = cfg.tokenizer if cfg.tokenizer is not None else base
    tok1 = tok_root / "tokenizer" if (tok_root / "tokenizer").is_dir() else tok_root
    tokenizers = [_load_tokenizer(tok1, "the text encoder")]
    if family == "sdxl":
        te2_dir = base / "text_encoder_2"
        text_encoders.append(_from_pretrained(CLIPTextModelWithProjection, te2_dir, "second text encoder",
                                              variant=_variant(te2_dir)))
        tok2 = tok_root / "tokenizer_2"
        tokenizers.append(_load_tokenizer(tok2, "the second text encoder") if tok2.is_dir()
                          else _load_tokenizer(tok1, "the second text encoder", pad_token="!"))
    sched_path = base / "scheduler" / "scheduler_config.json"
    sched_cfg = _read_json(sched_path) if sched_path.is_file() else shipped_config(family, "scheduler")
    if not sched_path.is_file():
        warnings.append(f"{base}: no scheduler/scheduler_config.json; using the shipped {family} noise schedule")
    prediction = _prediction(cfg, sched_cfg, base)
    weights = sorted(p for p in unet_dir.glob("*.safetensors")
                     if (unet_variant is None) == (len(p.suffixes) == 1))
    return BaseModels(
        unet=_finish(unet, device, dtype),
        vae=_finish(vae, device, dtype),
        text_encoders=[_finish(t, device, dtype) for t in text_encoders],
        tokenizers=tokenizers,
        scheduler=_ddpm(sched_cfg, prediction),
        family=family,
        prediction=prediction,
        model_hash=file_sha256(weights) if weights else None,
        source=base,
        kind="diffusers-folder",
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------------------ single files
def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"{path}: not a readable safetensors file ({e})") from None
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # any unpickling failure: a file we refuse to read
            msg = " ".join(str(e).split())[:200]
            raise CorruptFileError(f"{path}: cannot be loaded with torch.load(weights_only=True): {msg}") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise UnknownFormatError(f"{path}: not a state dict (found {type(obj).__name__})")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise UnknownFormatError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt")


def _assign(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], where: Path, what: str) -> Any:
    """Load ``sd`` into a module built on the meta device (tensors are assigned, not copied)."""
    own = module.state_dict()
    fixed: dict[str, torch.Tensor] = {}
    for k, v in sd.items():  # transformers 5 names CLIPTextModel tensors without the "text_model." level
        if k not in own and k.removeprefix("text_model.") in own:
            k = k.removeprefix("text_model.")
        elif k not in own and f"text_model.{k}" in own:
            k = f"text_model.{k}"
        fixed[k] = v
    missing = [k for k in own if k not in fixed and not k.endswith("position_ids")]
    if missing:
        raise IncompatibleBaseError(f"{where}: the {what} weights lack {missing[0]!r} ({len(missing)} missing); "
                                    "wrong model.family or architecture config?")
    try:
        module.load_state_dict({k: v for k, v in fixed.items() if k in own}, strict=False, assign=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise IncompatibleBaseError(f"{where}: the {what} does not fit its architecture config: {first}") from None
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise IncompatibleBaseError(f"{where}: the {what} has no value for buffer {name!r}")
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape), persistent=False)
    return module


def _component_config(family: Family, component: str, config_dir: Path | None) -> dict[str, Any]:
    if config_dir is not None:
        path = config_dir / component / "config.json"
        if not path.is_file():
            raise NotFoundError(f"{path}: config_dir has no {component} config")
        return {k: v for k, v in _read_json(path).items() if not k.startswith("_")}
    return shipped_config(family, component)


def _clip(cls: Any, config: Mapping[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    keys = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    with torch.device("meta"):
        return cls(CLIPTextConfig(**keys))


def _load_single_file(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                      config_dir: Path | None) -> BaseModels:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lyco_core.checkpoint import open_base

    path = cfg.base
    if cfg.tokenizer is None:
        raise InvalidConfigError(
            f"{path}: a single-file base needs model.tokenizer (a CLIP tokenizer folder: vocab.json + merges.txt, "
            "or a pipeline folder with tokenizer/[, tokenizer_2/])"
        )
    warnings: list[str] = []
    with open_base(path) as ck:
        detected, evidence = ck.family, ck.evidence
    if cfg.family == "auto":
        if detected == "unknown":
            raise UnknownFormatError(f"{path}: cannot tell the model family ({'; '.join(evidence)}); set model.family")
        family: Family = detected  # type: ignore[assignment]
    else:
        if detected not in ("unknown", cfg.family):
            raise IncompatibleBaseError(f"{path}: model.family is {cfg.family!r} but the checkpoint is {detected}")
        family = cfg.family

    sd = _load_state_dict(path)
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise UnknownFormatError(f"{path}: no LDM UNet (model.diffusion_model.*) in it; not a single-file checkpoint")
    unet_cfg = _component_config(family, "unet", config_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    _assign(unet, convert_ldm_unet_checkpoint(sd, unet_cfg), path, "UNet")

    if cfg.vae is not None:
        vae = _load_vae_override(cfg.vae, family, None, config_dir)
    else:
        if not any(k.startswith("first_stage_model.") for k in sd):
            raise NotFoundError(f"{path}: has no VAE weights (first_stage_model.*); set model.vae")
        vae = vae_from_state_dict(sd, _component_config(family, "vae", config_dir), path)

    te_cfg = _component_config(family, "text_encoder", config_dir)
    te: Any = _clip(CLIPTextModel, te_cfg)
    if family == "sd2":
        if not any(k.startswith("cond_stage_model.model.") for k in sd):
            raise UnknownFormatError(f"{path}: no OpenCLIP text encoder (cond_stage_model.model.*) in it")
        te_sd = convert_open_clip_checkpoint(te, sd, prefix="cond_stage_model.model.")
        te_sd.pop("text_projection.weight", None)
    else:
        te_sd = convert_ldm_clip_checkpoint(sd)
    text_encoders = [_assign(te, te_sd, path, "text encoder")]
    tok_root = cfg.tokenizer
    tok1 = tok_root / "tokenizer" if (tok_root / "tokenizer").is_dir() else tok_root
    tokenizers = [_load_tokenizer(tok1, "the text encoder (model.tokenizer)")]
    if family == "sdxl":
        te2 = _clip(CLIPTextModelWithProjection, _component_config(family, "text_encoder_2", config_dir))
        prefix = "conditioner.embedders.1.model."
        if not any(k.startswith(prefix) for k in sd):
            raise UnknownFormatError(f"{path}: no second text encoder ({prefix}*) in it")
        text_encoders.append(_assign(te2, convert_open_clip_checkpoint(te2, sd, prefix=prefix), path,
                                     "second text encoder"))
        tok2 = tok_root / "tokenizer_2"
        if tok2.is_dir():
            tokenizers.append(_load_tokenizer(tok2, "the second text encoder (model.tokenizer)"))
        else:
            tokenizers.append(_load_tokenizer(tok1, "the second text encoder (model.tokenizer)", pad_token="!"))
            warnings.append(f"{tok_root}: no tokenizer_2/; the second text encoder uses the same vocabulary, pad '!'")
    del sd

    shipped_sched = not (config_dir is not None and (config_dir / "scheduler" / "scheduler_config.json").is_file())
    if shipped_sched:
        sched_cfg = shipped_config(family, "scheduler")
    else:
        sched_cfg = _read_json(config_dir / "scheduler" / "scheduler_config.json")  # type: ignore[operator]
    prediction = _prediction(cfg, sched_cfg, path)
    if family == "sd2" and cfg.prediction == "auto" and shipped_sched:
        warnings.append(f"{path}: assumed v-prediction (SD 2.x 768-v); set model.prediction = \"epsilon\" for "
                        "512 px SD 2.x base models")
    return BaseModels(
        unet=_finish(unet, device, dtype),
        vae=_finish(vae, device, dtype),
        text_encoders=[_finish(t, device, dtype) for t in text_encoders],
        tokenizers=tokenizers,
        scheduler=_ddpm(sched_cfg, prediction),
        family=family,
        prediction=prediction,
        model_hash=file_sha256([path]),
        source=path,
        kind="single-file",
        warnings=warnings,
    )


def load_base(cfg: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              config_dir: str | Path | None = None) -> BaseModels:
    """Load ``cfg.base`` (a diffusers pipeline folder or an LDM single file) for training; see the module doc.

    ``config_dir``: for a single file, a diffusers pipeline folder whose ``unet/``, ``vae/``, ``text_encoder[_2]/``
    and ``scheduler/`` configs describe the file's architecture instead of the shipped configs of its family (for
    non-standard sizes). All modules are frozen (``requires_grad_(False)``) and in eval mode.
    """
    base = Path(cfg.base)
    if not base.exists():
        raise NotFoundError(f"{base}: no such base model (model.base)")
    cdir = Path(config_dir) if config_dir is not None else None
    if base.is_dir():
        return _load_folder(cfg, device, dtype, cdir)
    return _load_single_file(cfg, device, dtype, cdir)
