"""Image preprocessing exactly as the official LyCORIS-evaluation code (``data_utils/transform.py``).

The official transforms are torchvision's on PIL images; torchvision is not available here, so each step is
reproduced with PIL and numpy, keeping torchvision's size arithmetic and PIL's resampling:

* ``resize``: squash to S×S, bicubic (generated images, which are square).
* ``padding``: the longer side → S keeping the aspect (``round(dim·S/max)``), bicubic, then pad to S×S with black,
  centred, left/top getting ``floor(pad/2)`` (reference images in the paper's main figures). An image that is
  already S×S is left as it is.
* ``crop``: the shorter side → S (the longer side ``int(S·long/short)``, truncated, as torchvision), bicubic, then a
  centre crop of S×S (top/left offset ``int(round((dim − S)/2))``).
* ``resize_rectangle``: the shorter side → S only; the result may be a rectangle (VGG19 / ConvNeXt accept it and the
  official code uses it for them instead of ``resize``).

The image is converted to RGB *after* the geometric step (as the official code), then scaled to [0, 1] (uint8/255)
and normalised with the encoder's mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch
from PIL import Image

from lyco_core.errors import InvalidConfigError

ResizeMode = Literal["resize", "crop", "padding", "resize_rectangle"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

#: ImageNet normalisation (DINOv2, VGG19 in the official code).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: OpenAI CLIP normalisation (open_clip ViT-L-14 datacomp, HF laion CLIP folders).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise InvalidConfigError(f"resize mode {mode!r} is unknown; use one of {', '.join(RESIZE_MODES)}")


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(int)``: the shorter side becomes ``size``, the longer ``int(size·long/short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_image(img: Image.Image, size: int, mode: ResizeMode) -> Image.Image:
    """The geometric step of the official transform (see the module docstring), then RGB conversion.

    Args:
        img: any PIL image (its mode is kept until after resizing, as the official code).
        size: the target side S in pixels.
        mode: ``resize`` | ``crop`` | ``padding`` | ``resize_rectangle``.

    Returns:
        An RGB PIL image of S×S pixels (or, for ``resize_rectangle``, shorter side S).
    """
    _check_mode(mode)
    if size < 1:
        raise InvalidConfigError(f"image size must be ≥ 1, got {size}")
    width, height = img.size
    if mode == "resize":
        if (width, height) != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "padding":
        scale = size / float(max(width, height))
        if scale != 1 or width != height:
            new_h, new_w = round(height * scale), round(width * scale)
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            pad_w, pad_h = size - new_w, size - new_h
            canvas = Image.new(img.mode, (size, size), 0)  # type: ignore[arg-type]
            if img.mode == "P":
                palette = img.getpalette()
                if palette is not None:
                    canvas.putpalette(palette)
            canvas.paste(img, (pad_w // 2, pad_h // 2))
            img = canvas
    else:
        new_w, new_h = _shorter_side_size(width, height, size)
        if (new_w, new_h) != (width, height):
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if mode == "crop":
            top = round((new_h - size) / 2.0)
            left = round((new_w - size) / 2.0)
            img = img.crop((left, top, left + size, top + size))
    return img.convert("RGB")


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """An RGB PIL image → float32 tensor (3, H, W): uint8/255, then ``(x − mean)/std`` per channel."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def preprocess(
    img: Image.Image,
    size: int,
    mode: ResizeMode,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """The full official transform: geometry (``mode``), RGB, [0, 1], normalisation → float32 (3, H, W)."""
    return to_normalized_tensor(resize_image(img, size, mode), mean, std)


def preprocess_generated(
    img: Image.Image,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    rectangle: bool = False,
) -> torch.Tensor:
    """A generated image as the official code: squashed to S×S bicubic (``rectangle``: shorter side → S, for
    VGG19), normalised → float32 (3, S, S)."""
    return preprocess(img, size, "resize_rectangle" if rectangle else "resize", mean, std)


def preprocess_reference(
    img: Image.Image,
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """A reference (dataset) image as the paper's main figures: longer side → S, black padding to S×S, normalised
    → float32 (3, S, S)."""
    return preprocess(img, size, "padding", mean, std)
