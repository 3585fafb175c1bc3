"""Base models for training: loading (diffusers folder or single file), tiny pipelines, latent/text caches."""

from .encode import (
    LatentCache,
    TextCache,
    TextConditioning,
    encode_latents,
    encode_text,
    sdxl_time_ids,
    tokenize,
    vae_identity,
)
from .loading import BaseModels, load_base, shipped_config
from .tiny import build_tiny_pipeline, write_tiny_pipeline

__all__ = [
    "BaseModels",
    "LatentCache",
    "TextCache",
    "TextConditioning",
    "build_tiny_pipeline",
    "encode_latents",
    "encode_text",
    "load_base",
    "sdxl_time_ids",
    "shipped_config",
    "tokenize",
    "vae_identity",
    "write_tiny_pipeline",
]
