"""Aspect-ratio buckets (sd-scripts' scheme): train each image at the bucket closest to its shape.

With ``data.buckets = true`` the buckets are sd-scripts' ``make_bucket_resolutions``: for every width ``w`` that is
a multiple of ``bucket_step`` in ``[bucket_min, bucket_max]``, the bucket ``(w, h)`` and its transpose with
``h = min(bucket_max, ⌊resolution² / w / step⌋·step)`` (the tallest side of that width whose area is at most
``resolution²``) when ``h >= bucket_min``; plus the square ``s = ⌊resolution/step⌋·step``. All sides are multiples
of ``bucket_step`` (the square and all buckets share the step; keep it a multiple of 8 for the VAE, 64 for SD's
UNet to avoid padding). Note that non-square buckets need ``bucket_min < resolution``.

An image of size (w, h) goes to the bucket whose aspect ratio is closest on a log scale
(``|log(bw/bh) - log(w/h)|``, so a 2:1 and a 1:2 image are treated alike); ties go to the larger area, then the
wider bucket. With ``data.buckets = false`` there is one bucket ``(resolution, resolution)``.

Images are scaled (up or down, Lanczos) to cover the bucket and center-cropped (:func:`crop_box`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lyco_core.errors import InvalidConfigError

from ..config import DataConfig


def make_buckets(resolution: int, step: int, min_side: int, max_side: int) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), sorted, for a target area of ``resolution²`` pixels (see the module doc)."""
    area = resolution * resolution
    square = (resolution // step) * step
    if square < step:
        raise InvalidConfigError(f"data.resolution {resolution} is smaller than data.bucket_step {step}")
    out = {(square, square)}
    width = -(-min_side // step) * step
    while width <= max_side:
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            out.add((width, height))
            out.add((height, width))
        width += step
    return sorted(out)


def buckets_for(cfg: DataConfig) -> list[tuple[int, int]]:
    """The buckets ``cfg`` asks for (one square bucket when ``cfg.buckets`` is false)."""
    if not cfg.buckets:
        if cfg.resolution % 8:
            raise InvalidConfigError(f"data.resolution {cfg.resolution} must be a multiple of 8 (the VAE's factor)")
        return [(cfg.resolution, cfg.resolution)]
    return make_buckets(cfg.resolution, cfg.bucket_step, cfg.bucket_min, cfg.bucket_max)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket for an image of ``size`` = (width, height): closest log aspect ratio, then larger area/width."""
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1], -b[0]))


@dataclass(frozen=True)
class Crop:
    """How an image of some size is fitted to a bucket: resize to ``resized`` (w, h), then crop at (left, top).

    ``left``/``top`` are pixels in the resized image (SDXL's ``crops_coords_top_left`` is ``(top, left)``).
    """

    resized: tuple[int, int]
    left: int
    top: int


def crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> Crop:
    """Scale ``size`` to cover ``bucket`` keeping the aspect ratio, and center the crop."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return Crop(resized=(rw, rh), left=(rw - bw) // 2, top=(rh - bh) // 2)
