"""Encoding for training: VAE latents (cached in memory or on disk), text conditioning (cached), SDXL time ids.

Latents. An image's latents are ``vae.encode(pixels).latent_dist.sample(generator)`` with a generator seeded from
the cache key, times ``vae.config.scaling_factor`` (after subtracting ``shift_factor`` when a VAE has one). Like
sd-scripts, each image gets ONE posterior sample, drawn when it is cached, and reused every epoch; unlike
sd-scripts the sample is seeded, so the same file, bucket and VAE give bit-identical latents in every run and in
every cache mode (which the resume-equivalence of the loop relies on). (The SD VAEs' posterior std is ~1e-3 of the
latent scale, so sample vs mean hardly matters for quality.)

Cache keys: ``sha256(file bytes)``, the bucket (width, height) and a VAE identity (sha256 of the VAE's config and
weights, and of the encoding policy). Disk mode writes ``<folder>/<key>.safetensors`` atomically, so several
processes or an interrupted run never leave a half file; a changed image, bucket or VAE is simply a new key.

Text. :func:`encode_text` follows diffusers' pipelines: SD 1.x/2.x use the text encoder's last hidden state (SD 2.x's
diffusers text encoder already lacks OpenCLIP's last layer); SDXL concatenates the penultimate hidden states of
both encoders (768 + 1280 = 2048 wide) and uses the second encoder's projected pooled output, as
``StableDiffusionXLPipeline.encode_prompt`` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lyco_core.errors import CorruptFileError, InvalidConfigError
from lyco_core.formats.safetensors_io import load_tensors, save_tensors

CacheMode = Literal["memory", "disk", "none"]
#: Part of every latent cache key: bump when the way latents are computed changes.
LATENT_POLICY = "lyco-latents-v1:posterior-sample-seeded-by-key,scaled"


def vae_identity(vae: Any) -> str:
    """A short sha256 of the VAE's config and weights (names, dtypes, shapes, bytes) and :data:`LATENT_POLICY`."""
    h = hashlib.sha256(LATENT_POLICY.encode())
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, t in vae.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_latents(vae: Any, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """Scaled latents of one image.

    Args:
        pixels: (3, H, W) float in [-1, 1]; H and W multiples of the VAE's downsampling factor (8).
        seed: seeds the posterior sample.

    Returns:
        (C, H/8, W/8) float32 on the CPU (C = 4 for SD), ``(z - shift_factor) * scaling_factor``.
    """
    param = next(vae.parameters())
    x = pixels.to(device=param.device, dtype=param.dtype).unsqueeze(0)
    dist = vae.encode(x).latent_dist
    g = torch.Generator(device=param.device).manual_seed(seed)
    z = dist.sample(generator=g)[0].float()
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return (z * vae.config.scaling_factor).cpu()


class LatentCache:
    """Latents per (image file, bucket), computed once.

    Args:
        vae: the (frozen) VAE.
        mode: "memory" (a dict), "disk" (``folder``/<key>.safetensors, kept across runs) or "none" (encode every
            time; the same seeded sample, so results are identical to the cached modes).
        folder: the disk cache folder (created); required for "disk".
        identity: the VAE identity in the keys (computed with :func:`vae_identity` when None).

    ``hits`` / ``misses`` count lookups answered from the cache / by encoding.
    """

    def __init__(self, vae: Any, mode: CacheMode = "memory", folder: str | Path | None = None,
                 identity: str | None = None) -> None:
        if mode not in ("memory", "disk", "none"):
            raise InvalidConfigError(f"data.cache_latents {mode!r}: expected 'memory', 'disk' or 'none'")
        if mode == "disk":
            if folder is None:
                raise InvalidConfigError("data.cache_latents = 'disk' needs a cache folder")
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.vae = vae
        self.mode = mode
        self.folder = Path(folder) if folder is not None else None
        self.identity = identity or vae_identity(vae)
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, torch.Tensor] = {}
        self._file_hash: dict[tuple[str, int, int], str] = {}

    def file_hash(self, path: Path) -> str:
        """sha256 of the file's bytes (remembered per path, size and mtime)."""
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._file_hash:
            self._file_hash[memo] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._file_hash[memo]

    def key(self, item_path: str | Path, bucket: tuple[int, int]) -> str:
        """The cache key: sha256 of (file hash, bucket (width, height), VAE identity), hex."""
        w, h = bucket
        text = f"{self.file_hash(Path(item_path))}|{w}x{h}|{self.identity}"
        return hashlib.sha256(text.encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.safetensors"

    def get(
        self, item_path: str | Path, bucket: tuple[int, int], pixels_fn: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """Latents (4, h, w) float32 (CPU) of ``item_path`` at ``bucket`` (width, height); ``pixels_fn()`` gives the
        image as (3, height, width) in [-1, 1] and is only called on a miss."""
        key = self.key(item_path, bucket)
        if self.mode == "memory" and key in self._memory:
            self.hits += 1
            return self._memory[key]
        if self.mode == "disk":
            path = self.path_for(key)
            if path.is_file():
                try:
                    z = load_tensors(path)["latents"]
                except (CorruptFileError, KeyError, OSError):
                    z = None  # a damaged entry is recomputed and replaced
                if z is not None:
                    self.hits += 1
                    return z
        self.misses += 1
        z = encode_latents(self.vae, pixels_fn(), seed=int(key[:15], 16))
        if self.mode == "memory":
            self._memory[key] = z
        elif self.mode == "disk":
            save_tensors(self.path_for(key), {"latents": z}, {"item": os.fspath(item_path),
                                                              "bucket": f"{bucket[0]}x{bucket[1]}",
                                                              "vae": self.identity}, overwrite=True)
        return z


# ------------------------------------------------------------------------------------------------ text
@dataclass
class TextConditioning:
    """Text-encoder outputs for a batch of captions.

    ``hidden``: (B, 77, D) — D = 768 (SD1), 1024 (SD2), 2048 (SDXL: 768 + 1280). ``pooled``: (B, P) for SDXL (the
    second encoder's projected pooled output, P = 1280), else None.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TextConditioning:
        return TextConditioning(self.hidden.to(device=device, dtype=dtype),
                                None if self.pooled is None else self.pooled.to(device=device, dtype=dtype))


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Token ids (B, model_max_length): padded to the maximum length and truncated, as the SD pipelines do."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_text(models: Any, captions: Sequence[str]) -> TextConditioning:
    """Encode ``captions`` with ``models.text_encoders`` / ``models.tokenizers`` (a :class:`BaseModels`).

    Gradients flow when a text encoder is being trained (call under ``torch.no_grad()`` otherwise). Outputs are on
    the text encoders' device and dtype.
    """
    encoders, tokenizers = models.text_encoders, models.tokenizers
    if models.family != "sdxl":
        te = encoders[0]
        ids = tokenize(tokenizers[0], captions).to(te.device)
        return TextConditioning(te(ids)[0])
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tok, te in zip(tokenizers, encoders):
        out = te(tokenize(tok, captions).to(te.device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[-2])
    return TextConditioning(torch.cat(hidden, dim=-1), pooled)


class TextCache:
    """Text conditioning per caption string, computed once (only valid while the text encoders are frozen).

    ``get(captions)`` encodes the captions it has not seen in one batch (under ``no_grad``) and returns the batch's
    conditioning stacked in caption order. ``misses`` counts captions encoded, ``hits`` the other lookups.
    """

    def __init__(self, models: Any) -> None:
        self.models = models
        self.hits = 0
        self.misses = 0
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, captions: Sequence[str]) -> TextConditioning:
        new = list(dict.fromkeys(c for c in captions if c not in self._cache))
        self.misses += len(new)  # each new caption is encoded once, even when it repeats in the batch
        self.hits += len(captions) - len(new)
        if new:
            with torch.no_grad():
                cond = encode_text(self.models, new)
            for i, c in enumerate(new):
                self._cache[c] = (cond.hidden[i], None if cond.pooled is None else cond.pooled[i])
        rows = [self._cache[c] for c in captions]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])  # type: ignore[misc]
        return TextConditioning(torch.stack([r[0] for r in rows]), pooled)


def sdxl_time_ids(original_size: tuple[int, int], crop: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """SDXL's size conditioning (``add_time_ids``): (6,) float32 = original (height, width), crop (top, left),
    target (height, width), in pixels — the order of ``StableDiffusionXLPipeline._get_add_time_ids``. Note the
    (height, width) order: data buckets are (width, height)."""
    return torch.tensor([*original_size, *crop, *target_size], dtype=torch.float32)
