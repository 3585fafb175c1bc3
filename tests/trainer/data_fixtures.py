"""Small image datasets written with PIL for the data tests (and anyone who needs a concept tree)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 40, 40),
                caption: str | None = None, **save: object) -> Path:
    """A flat-colour image of ``size`` = (w, h) (format from the suffix) and, if given, its same-name caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def write_concept(folder: Path, n: int, *, size: tuple[int, int] = (32, 32), captions: bool = True,
                  suffix: str = ".png") -> list[Path]:
    """``n`` images ``img_00.png``… in ``folder`` with captions ``"tag{i}, common"`` (when ``captions``)."""
    return [
        write_image(folder / f"img_{i:02d}{suffix}", size, (10 * i % 256, 90, 160),
                    caption=f"tag{i}, common" if captions else None)
        for i in range(n)
    ]


def write_corrupt_png(path: Path) -> Path:
    """A file named .png that is a PNG cut in half (header fine, data truncated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG of noise cut after 60 % of its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path
