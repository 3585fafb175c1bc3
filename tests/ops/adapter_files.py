"""Adapter files with trained-like (random, non-zero) parameters on tiny SD components, for the ops tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tiny_sd import tiny_clip_text, tiny_sd1_unet

import lyco_core as lc

#: Lyco options of one variant per algorithm family the ops must handle.
VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"algo": "lora"},
    "lora-tucker": {"algo": "lora", "use_tucker": True},
    "lora-dora": {"algo": "lora", "dora": True},
    "loha": {"algo": "loha"},
    "lokr": {"algo": "lokr", "factor": 4},
    "lokr-full": {"algo": "lokr", "factor": 4, "dim": 100000},
    "ia3": {"algo": "ia3"},
    "glora": {"algo": "glora"},
    "full": {"algo": "full"},
    "diag-oft": {"algo": "diag-oft"},
    "boft": {"algo": "boft"},
    "dylora": {"algo": "dylora", "block_size": 2},
}

#: LoCon-style targets: attention and MLP linears, 1×1 and 3×3 convs in resnets, samplers, conv_in/out.
PRESET: dict[str, Any] = {
    "unet": {"target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
             "target_name": ["conv_in", "conv_out"]},
    "text_encoder": {"target_module": ["CLIPAttention", "CLIPMLP"]},
}


def models() -> dict[str, torch.nn.Module]:
    """A fresh tiny SD1-layout UNet and CLIP text encoder (same weights on every call)."""
    return {"unet": tiny_sd1_unet(), "te": tiny_clip_text()}


def randomise(net: lc.AdapterNetwork, seed: int = 1, scale: float = 0.05) -> None:
    """Trained-like parameters: small random values (magnitudes and scalars keep their size)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.trainable_parameters():
            keep = p.ndim > 0 and p.abs().mean() > 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (p if keep else 0))


def make_adapter(
    path: Path, variant: str = "lora", *, seed: int = 1, model: dict[str, torch.nn.Module] | None = None, **opts: Any
) -> Path:
    """Write a ``variant`` adapter (see :data:`VARIANTS`, ``opts`` override) for :func:`models` to ``path``."""
    options = {"dim": 4, "alpha": 2.0, **VARIANTS[variant], **opts}
    net = lc.create_network(model or models(), preset=PRESET, **options)
    randomise(net, seed)
    net.save(path, base_family="sd1")
    return path


def base_weights(
    model: dict[str, torch.nn.Module] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Adapter module key → (weight, bias) of the layer it targets, for every layer the preset may adapt."""
    model = model or models()
    net = lc.create_network(model, preset=PRESET, algo="full")
    return {m.key: (m.base.weight.detach().clone(), _bias(m)) for m in net}


def _bias(m: Any) -> torch.Tensor | None:
    b = getattr(m.base, "bias", None)
    return None if b is None else b.detach().clone()
