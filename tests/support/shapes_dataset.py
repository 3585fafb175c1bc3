"""The "shapes" dataset the trainer and service tests train on: two concepts of small drawn images with captions."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

#: Concept name → fill colour (RGB).
SHAPES = {"circle": (220, 40, 40), "square": (40, 60, 220)}
COLOUR_WORDS = {"circle": "red", "square": "blue"}


def write_dataset(root: Path, n: int = 3, size: int = 32, *, colour_tags: bool = True) -> Path:
    """``root/shapes/circle`` and ``root/shapes/square``: ``n`` PNGs each (``size`` px, the shape shifted and the
    background shaded per image) with captions ``"circle, red, shape"`` (``"circle, shape"`` without
    ``colour_tags``). Returns ``root``."""
    for shape, color in SHAPES.items():
        folder = root / "shapes" / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = Image.new("RGB", (size, size), (240 - 30 * i, 240, 230))
            d = ImageDraw.Draw(im)
            box = (4 + i, 4 + i, size - 6 + i, size - 6 + i)
            (d.ellipse if shape == "circle" else d.rectangle)(box, fill=color)
            im.save(folder / f"{shape}_{i}.png")
            tags = f"{shape}, {COLOUR_WORDS[shape]}, shape" if colour_tags else f"{shape}, shape"
            (folder / f"{shape}_{i}.txt").write_text(tags)
    return root
