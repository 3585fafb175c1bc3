"""DINOv2 image features: transformers ``Dinov2Model``, the CLS token after the final LayerNorm.

The official code uses the torch.hub ViT-L/14 whose forward returns ``x_norm_clstoken``; transformers'
``pooler_output`` is the same quantity (``layernorm(last hidden state)[:, 0]``). Inputs are 224×224 with ImageNet
normalisation (not HF's default processor, which resizes to 256 and crops).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lyco_core.errors import UnknownFormatError

from .base import Encoder, module_fingerprint, pick_device
from .hf import folder_fingerprint, from_pretrained, read_config, resolve_folder
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

#: Input side of the official code (the ViT-L/14 hub model; HF interpolates its 518-px position embeddings).
DINOV2_IMAGE_SIZE = 224
#: The tiny test model (``Dinov2Config`` has no intermediate_size; the MLP width is ``mlp_ratio``·hidden).
TINY_DINOV2_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "mlp_ratio": 2,
    "image_size": 28,
    "patch_size": 14,
}
if TYPE_CHECKING:
    from transformers import Dinov2Model

_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


class DinoV2Encoder(Encoder):
    """DINOv2 CLS-after-LayerNorm features (N, hidden) of images preprocessed at 224 px with ImageNet mean/std."""

    kind = "dinov2"

    def __init__(self, model: torch.nn.Module, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model.to(self.device).eval()

    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels)
        return out.pooler_output


def tiny_dinov2_model(seed: int = 0) -> Dinov2Model:
    """A tiny random ``Dinov2Model`` (hidden 32, 2 layers, 4 heads, patch 14), deterministic for ``seed``."""
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(Dinov2Config(**TINY_DINOV2_CONFIG)).eval()


def load_dinov2(
    path: Path | str | None,
    *,
    tiny: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    autocast: bool | None = None,
) -> DinoV2Encoder:
    """A DINOv2 encoder from a transformers folder (or hub id cached locally), or the tiny model when ``tiny``."""
    dev = pick_device(device)
    size = image_size or DINOV2_IMAGE_SIZE
    common: dict[str, Any] = {"image_size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "device": dev,
                              "autocast": autocast}
    if tiny:
        model = tiny_dinov2_model(seed)
        ident = f"dinov2:tiny:{module_fingerprint(model, TINY_DINOV2_CONFIG)}"
        return DinoV2Encoder(model, identity=ident, source="tiny dinov2", **common)
    from transformers import AutoModel

    folder = resolve_folder(path, "dinov2")  # type: ignore[arg-type]
    model_type = read_config(folder).get("model_type")
    if model_type not in _MODEL_TYPES:
        kinds = ", ".join(_MODEL_TYPES)
        raise UnknownFormatError(f"{folder}: model_type {model_type!r} is not a DINOv2 model ({kinds})")
    model = from_pretrained(AutoModel, folder, "dinov2")
    ident = f"dinov2:{folder.name}:{folder_fingerprint(folder)}"
    return DinoV2Encoder(model, identity=ident, source=str(folder), **common)


def write_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """Save the tiny DINOv2 as a transformers folder (``config.json`` + ``model.safetensors``) at ``folder``."""
    tiny_dinov2_model(seed).save_pretrained(str(folder))
    return folder
