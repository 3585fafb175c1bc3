"""The encoder interface shared by DINOv2, CLIP and VGG19, and helpers for fingerprints and devices."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from lyco_core.errors import CorruptFileError, InvalidConfigError, NotFoundError

from .preprocess import ResizeMode, preprocess

EncoderKind = Literal["dinov2", "clip", "vgg19"]
ENCODER_KINDS: tuple[str, ...] = ("dinov2", "clip", "vgg19")

_EDGE_BYTES = 1 << 20


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def file_fingerprint(paths: Sequence[Path]) -> str:
    """A cheap content fingerprint of model files: name, size, first and last MiB of each (sha256 hex, 16 chars).

    Hashing whole multi-GB weight files on every run would cost seconds; the size plus both ends changes whenever
    the weights do in practice (safetensors headers hold every tensor's offsets).
    """
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            h.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()[:16]


def module_fingerprint(module: torch.nn.Module, extra: object = None) -> str:
    """A fingerprint of a module's parameters and buffers (for tiny in-memory models; sha256 hex, 16 chars)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def require_path(path: Path | str | None, kind: str) -> Path:
    """``path`` as a Path that exists, else :class:`NotFoundError` (one line, naming it)."""
    if path is None:
        raise InvalidConfigError(f"{kind} encoder: give a weights path (or tiny=True for a tiny test model)")
    p = Path(path).expanduser()
    if not p.exists():
        raise NotFoundError(f"{p}: {kind} encoder weights not found")
    return p


class Encoder:
    """An image (and for CLIP, text) feature extractor with the official code's preprocessing.

    Attributes:
        kind: ``dinov2`` | ``clip`` | ``vgg19``.
        identity: a string that changes whenever the weights, the architecture or the feature definition change
            (cache keys use it together with :meth:`preprocessing`).
        image_size: S, the side the preprocessing produces (pixels).
        mean, std: the normalisation constants (per RGB channel, for [0, 1] pixels).
        generated_mode: the resize mode of generated images (``resize``; ``resize_rectangle`` for VGG19).
        reference_mode: the resize mode of reference (dataset) images (``padding``, as the paper's main figures).
        device: where the model runs; features are returned on the CPU as float32.
        autocast: run under ``torch.autocast(float16)`` (the official code's setting on CUDA).
    """

    kind: str = ""
    generated_mode: ResizeMode = "resize"
    reference_mode: ResizeMode = "padding"

    def __init__(
        self,
        *,
        identity: str,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        autocast: bool | None,
        source: str,
    ) -> None:
        if image_size < 1:
            raise InvalidConfigError(f"{self.kind} encoder: image_size must be ≥ 1, got {image_size}")
        self.identity = identity
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.device = device
        self.autocast = device.type == "cuda" if autocast is None else bool(autocast)
        self.source = source

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r}, size={self.image_size}, device={self.device})"

    # ------------------------------------------------------------------------------------------- preprocessing
    def resize_mode(self, *, reference: bool = False, mode: ResizeMode | None = None) -> ResizeMode:
        """The resize mode used for an image: ``mode`` if given, else the reference or generated default."""
        if mode is not None:
            return mode
        return self.reference_mode if reference else self.generated_mode

    def preprocessing(self, *, reference: bool = False, mode: ResizeMode | None = None) -> str:
        """A string naming the preprocessing (mode, size, mean/std, precision), part of feature cache keys."""
        precision = "fp16-autocast" if self.autocast else "fp32"
        m = self.resize_mode(reference=reference, mode=mode)
        return f"{m}:{self.image_size}:mean={self.mean}:std={self.std}:{precision}"

    def preprocess_generated(self, img: Image.Image) -> torch.Tensor:
        """A generated image → normalised float32 (3, S, S) (``resize``; VGG19: shorter side → S)."""
        return preprocess(img, self.image_size, self.generated_mode, self.mean, self.std)

    def preprocess_reference(self, img: Image.Image) -> torch.Tensor:
        """A reference image → normalised float32 (3, S, S) (longer side → S, black padding)."""
        return preprocess(img, self.image_size, self.reference_mode, self.mean, self.std)

    def pixel_batch(
        self, images: Sequence[Image.Image], *, reference: bool = False, mode: ResizeMode | None = None
    ) -> torch.Tensor:
        """Preprocess ``images`` into one float32 batch (N, 3, H, W) on :attr:`device`.

        All images must come out the same size (always true except ``resize_rectangle`` on mixed aspect ratios).
        """
        if len(images) == 0:
            raise InvalidConfigError(f"{self.kind} encoder: no images given")
        m = self.resize_mode(reference=reference, mode=mode)
        tensors = [preprocess(img, self.image_size, m, self.mean, self.std) for img in images]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise InvalidConfigError(
                f"{self.kind} encoder: images of different aspect ratios in one batch with mode {m!r} "
                f"(sizes {sorted(shapes)}); encode them separately"
            )
        return torch.stack(tensors).to(self.device)

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        with torch.no_grad():
            if self.autocast:
                with torch.autocast(device_type=self.device.type, dtype=torch.float16):
                    yield
            else:
                yield

    def _finite(self, t: torch.Tensor, what: str) -> torch.Tensor:
        t = t.detach().to("cpu", torch.float32)
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0, 0]) if t.dim() > 1 else 0
            raise CorruptFileError(f"{self.source}: {self.kind} encoder gave non-finite {what} (item {bad})")
        return t

    # ------------------------------------------------------------------------------------------- features
    def _image_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise InvalidConfigError(f"{self.kind} encoder has no image embedding; use feature_maps")

    def image_features(
        self,
        images: Sequence[Image.Image],
        *,
        reference: bool = False,
        mode: ResizeMode | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Embeddings of ``images`` → float32 (N, D) on the CPU, not normalised (the metrics normalise).

        Args:
            images: PIL images.
            reference: preprocess as reference (dataset) images (padding) instead of generated ones (resize).
            mode: override the resize mode (``resize`` | ``crop`` | ``padding``).
            batch_size: images per forward pass.
        """
        out: list[torch.Tensor] = []
        for i in range(0, len(images), max(1, batch_size)):
            pixels = self.pixel_batch(images[i : i + batch_size], reference=reference, mode=mode)
            with self._precision():
                feats = self._image_forward(pixels)
            out.append(self._finite(feats, "image features"))
        if not out:
            raise InvalidConfigError(f"{self.kind} encoder: no images given")
        return torch.cat(out)

    def text_features(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts`` → float32 (N, D) (CLIP only)."""
        raise InvalidConfigError(f"{self.kind} encoder has no text tower; text features need the clip encoder")

    def feature_maps(
        self, images: Sequence[Image.Image], *, reference: bool = False, mode: ResizeMode | None = None
    ) -> list[torch.Tensor]:
        """Intermediate feature maps, list of float32 (N, C, H, W) (VGG19 only)."""
        raise InvalidConfigError(f"{self.kind} encoder has no feature maps; they need the vgg19 encoder")
