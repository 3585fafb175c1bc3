"""Base checkpoints on disk in every layout Lyco reads, written from tiny diffusers/transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lyco_core.formats.unet_naming import UNetLayout, diffusers_to_ldm


def save_pipeline(folder: Path, unet: torch.nn.Module, te: torch.nn.Module, te2: torch.nn.Module | None = None) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, text_encoder/[, text_encoder_2/], plus a scheduler)."""
    folder.mkdir(parents=True)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", type(te).__name__]}
    unet.save_pretrained(folder / "unet")
    te.save_pretrained(folder / "text_encoder")
    if te2 is not None:
        te2.save_pretrained(folder / "text_encoder_2")
        index["text_encoder_2"] = ["transformers", type(te2).__name__]
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _hf_te(te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the ``text_model.`` level (as LDM checkpoints store it)."""
    sd = te.state_dict()
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


def openclip_te(te: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP text model in the OpenCLIP layout of SD2/SDXL-te2 LDM checkpoints (q/k/v fused into in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in _hf_te(te).items()}
    out: dict[str, torch.Tensor] = {}
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(n_layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[oc + f"attn.in_proj_{kind}"] = torch.cat([sd[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[oc + f"attn.out_proj.{kind}"] = sd[hf + f"self_attn.out_proj.{kind}"]
            out[oc + f"mlp.c_fc.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[oc + f"mlp.c_proj.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
            out[oc + f"ln_1.{kind}"] = sd[hf + f"layer_norm1.{kind}"]
            out[oc + f"ln_2.{kind}"] = sd[hf + f"layer_norm2.{kind}"]
    out["ln_final.weight"] = sd["final_layer_norm.weight"]
    out["ln_final.bias"] = sd["final_layer_norm.bias"]
    out["token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["embeddings.position_embedding.weight"]
    return out


def ldm_state_dict(
    unet: torch.nn.Module,
    te: torch.nn.Module | None = None,
    *,
    te_layout: str = "sd1",
    te2: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """An LDM single-file state dict: ``te_layout`` "sd1" (HF CLIP), "sd2" (OpenCLIP) or "sdxl" (te + OpenCLIP te2)."""
    layout = UNetLayout.from_config(unet.config)
    sd = {f"model.diffusion_model.{diffusers_to_ldm(k, layout)}": v for k, v in unet.state_dict().items()}
    if te is not None:
        if te_layout == "sd1":
            sd.update({f"cond_stage_model.transformer.{k}": v for k, v in _hf_te(te).items()})
        elif te_layout == "sd2":
            sd.update({f"cond_stage_model.model.{k}": v for k, v in openclip_te(te).items()})
        else:
            sd.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in _hf_te(te).items()})
            assert te2 is not None
            sd.update({f"conditioner.embedders.1.model.{k}": v for k, v in openclip_te(te2).items()})
    sd["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    return {k: v.contiguous() for k, v in sd.items()}


def save_ldm(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd}, path)
    else:
        save_file(sd, str(path), metadata={"format": "pt"})
    return path
