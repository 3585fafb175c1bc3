"""Feature extractors of the evaluation (DINOv2, CLIP, VGG19) from local weights, with the official preprocessing.

* :func:`load_encoder` ``(kind, path, *, tiny=False)`` → :class:`Encoder`:
  ``dinov2`` (transformers folder: CLS after the final LayerNorm, 224 px, ImageNet mean/std),
  ``clip`` (transformers ``CLIPModel`` folder, or an open_clip checkpoint file when open_clip is installed:
  projected image/text embeddings, the vision tower's size, OpenAI mean/std),
  ``vgg19`` (torchvision ``vgg19`` state dict file: conv1_1…conv5_1 maps before ReLU, ImageNet mean/std).
  ``tiny=True`` builds a small deterministic random model from a config instead (tests, demo).
* Preprocessing (:mod:`.preprocess`): generated images are resized (squashed) to S×S, reference images padded
  (longer side → S, black borders); VGG19 keeps the aspect of generated images (shorter side → S).
* :class:`FeatureCache` stores features per (encoder identity, image sha256 or text, preprocessing);
  :func:`cached_image_features` / :func:`cached_text_features` encode files and texts through it.
* :func:`write_tiny_encoder` saves a tiny encoder in the real on-disk format, so the loading path is exercised too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lyco_core.errors import InvalidConfigError

from .base import ENCODER_KINDS, Encoder, EncoderKind
from .cache import (
    FeatureCache,
    cached_image_features,
    cached_image_values,
    cached_text_features,
    file_sha256,
    image_source,
    open_image,
    text_source,
)
from .clip import ClipEncoder, OpenClipEncoder, load_clip, write_tiny_clip
from .dinov2 import DinoV2Encoder, load_dinov2, write_tiny_dinov2
from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RESIZE_MODES,
    ResizeMode,
    preprocess,
    preprocess_generated,
    preprocess_reference,
    resize_image,
)
from .vgg import TAP_INDICES, TAP_NAMES, VGG19Features, VggEncoder, VggTaps, load_vgg19, write_tiny_vgg19

__all__ = [
    "ENCODER_KINDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RESIZE_MODES",
    "TAP_INDICES",
    "TAP_NAMES",
    "ClipEncoder",
    "DinoV2Encoder",
    "Encoder",
    "EncoderKind",
    "FeatureCache",
    "OpenClipEncoder",
    "ResizeMode",
    "VGG19Features",
    "VggEncoder",
    "VggTaps",
    "cached_image_features",
    "cached_image_values",
    "cached_text_features",
    "file_sha256",
    "image_source",
    "load_encoder",
    "open_image",
    "preprocess",
    "preprocess_generated",
    "preprocess_reference",
    "resize_image",
    "text_source",
    "write_tiny_encoder",
]


def load_encoder(
    kind: str,
    path: Path | str | None,
    *,
    tiny: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    autocast: bool | None = None,
    arch: str | None = None,
    taps: VggTaps = "pre_relu",
) -> Encoder:
    """Load an encoder from local weights, or build a tiny one.

    Args:
        kind: ``dinov2`` | ``clip`` | ``vgg19``.
        path: a transformers ``save_pretrained`` folder (dinov2, clip; a hub id works when it is in the local HF
            cache), an open_clip checkpoint file (clip, needs ``open_clip_torch``), or a torchvision vgg19 state
            dict file (vgg19). Must be None when ``tiny``.
        tiny: build a tiny random model (deterministic for ``seed``) instead of loading weights.
        image_size: override the input side S (default: 224 for dinov2/vgg19, the vision tower's size for clip).
        device: where the model runs (default CUDA when available).
        autocast: float16 autocast (default: on CUDA, as the official code).
        arch: open_clip model name for a checkpoint file (default ``ViT-L-14``).
        taps: vgg19 tap definition: ``pre_relu`` (the issue's) or ``official`` (the official code's in-place ReLU
            effect; see :mod:`.vgg`).

    Missing weights raise :class:`NotFoundError` naming the path.
    """
    if kind not in ENCODER_KINDS:
        raise InvalidConfigError(f"encoder kind {kind!r} is unknown; use one of {', '.join(ENCODER_KINDS)}")
    if tiny and path is not None:
        raise InvalidConfigError(f"{kind} encoder: tiny=True builds a model from a config; do not also give a path")
    common: dict[str, Any] = {"tiny": tiny, "seed": seed, "image_size": image_size, "device": device,
                              "autocast": autocast}
    if kind == "dinov2":
        return load_dinov2(path, **common)
    if kind == "clip":
        return load_clip(path, arch=arch, **common)
    return load_vgg19(path, taps=taps, **common)


def write_tiny_encoder(kind: str, path: Path | str, *, seed: int = 0) -> Path:
    """Save the tiny ``kind`` encoder where :func:`load_encoder` reads real weights from: a transformers folder
    (dinov2, clip with tokenizer) or a torchvision-layout safetensors file (vgg19). Returns ``path``."""
    p = Path(path)
    if kind == "dinov2":
        return write_tiny_dinov2(p, seed)
    if kind == "clip":
        return write_tiny_clip(p, seed)
    if kind == "vgg19":
        return write_tiny_vgg19(p, seed)
    raise InvalidConfigError(f"encoder kind {kind!r} is unknown; use one of {', '.join(ENCODER_KINDS)}")
