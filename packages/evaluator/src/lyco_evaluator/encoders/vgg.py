"""VGG19 feature maps for Gram-matrix style losses, without torchvision.

:class:`VGG19Features` has torchvision's ``vgg19().features`` layout (index i of the ``nn.Sequential`` is the same
layer: conv 3×3 pad 1, ReLU, max-pool 2×2), so the ``features.*`` entries of a torchvision ``vgg19`` state dict
(``vgg19-dcbb9e9d.pth``) load into it strictly; ``classifier.*`` entries are accepted and dropped. Channel widths
are read from the state dict, so a tiny VGG with the same layout loads the same way.

Taps: ``features`` indices 0, 5, 10, 19, 28 = conv1_1, conv2_1, conv3_1, conv4_1, conv5_1, taken right after the
convolution, **before ReLU** (the issue's definition). ``taps="official"`` reproduces what the official code
actually computes: it appends each tapped tensor to a list and then runs torchvision's ``ReLU(inplace=True)`` on it,
so conv1_1…conv4_1 end up *after* ReLU and only conv5_1 (the last layer of ``features[:29]``) is before ReLU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from lyco_core.errors import CorruptFileError, InvalidConfigError, UnknownFormatError

from .base import Encoder, file_fingerprint, module_fingerprint, pick_device, require_path
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ResizeMode

VggTaps = Literal["pre_relu", "official"]
#: torchvision's VGG19 ("E") configuration: conv widths, "M" = max-pool.
VGG19_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                       512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
#: Tiny widths per stage for tests (same layout, 16 convs).
TINY_VGG_WIDTHS: tuple[int, ...] = (4, 4, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16)
TAP_INDICES: tuple[int, ...] = (0, 5, 10, 19, 28)
TAP_NAMES: tuple[str, ...] = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1")
VGG_IMAGE_SIZE = 224


def conv_indices() -> list[int]:
    """``features`` indices of the 16 convolutions (0, 2, 5, 7, 10, …, 34)."""
    idx: list[int] = []
    i = 0
    for item in VGG19_LAYOUT:
        if item == "M":
            i += 1
        else:
            idx.append(i)
            i += 2
    return idx


class VGG19Features(nn.Module):
    """torchvision ``vgg19().features`` (37 layers) with conv widths ``widths`` (16 ints; default the real ones).

    ``forward(x)`` with x (N, 3, H, W) normalised pixels returns the 5 tap maps (N, C_k, H/2^k, W/2^k), k = 0…4.
    Only ``features[:29]`` runs.
    """

    def __init__(self, widths: Sequence[int] | None = None, taps: VggTaps = "pre_relu") -> None:
        super().__init__()
        real = [c for c in VGG19_LAYOUT if isinstance(c, int)]
        widths = list(widths) if widths is not None else real
        if len(widths) != len(real):
            raise InvalidConfigError(f"VGG19 needs {len(real)} conv widths, got {len(widths)}")
        if taps not in ("pre_relu", "official"):
            raise InvalidConfigError(f"vgg taps {taps!r} is unknown; use 'pre_relu' or 'official'")
        self.taps = taps
        layers: list[nn.Module] = []
        c_in = 3
        w = iter(widths)
        for item in VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                c_out = next(w)
                layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = c_out
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps: list[torch.Tensor] = []
        last = TAP_INDICES[-1]
        for i, layer in enumerate(list(self.features)[: last + 1]):
            x = layer(x)
            if i in TAP_INDICES:
                # official: the following in-place ReLU rewrites the tapped tensor (all taps but the last)
                maps.append(torch.relu(x) if self.taps == "official" and i != last else x)
        return maps


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from lyco_core.formats.safetensors_io import load_tensors

        return load_tensors(path)
    try:
        data: Any = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise CorruptFileError(f"{path}: unreadable VGG19 weights ({str(e).splitlines()[0][:160]})") from e
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UnknownFormatError(f"{path}: not a VGG19 state dict (expected a mapping of tensors)")
    return dict(data)


def vgg19_from_state_dict(state: Mapping[str, torch.Tensor], where: str, taps: VggTaps = "pre_relu") -> VGG19Features:
    """Build :class:`VGG19Features` with widths read from a torchvision-layout state dict and load it strictly.

    ``classifier.*`` entries are dropped; any other key outside ``features.*``, a missing conv or a shape that does
    not chain raises :class:`CorruptFileError` naming ``where`` and the key.
    """
    features: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("features."):
            features[k.removeprefix("features.")] = v
        elif not k.startswith("classifier."):
            raise CorruptFileError(f"{where}: unexpected key {k!r} in VGG19 weights (torchvision vgg19 layout)")
    widths: list[int] = []
    for i in conv_indices():
        w = features.get(f"{i}.weight")
        if w is None:
            raise CorruptFileError(f"{where}: VGG19 weights lack features.{i}.weight")
        if w.dim() != 4 or tuple(w.shape[2:]) != (3, 3):
            raise CorruptFileError(f"{where}: features.{i}.weight has shape {tuple(w.shape)}, not (C_out, C_in, 3, 3)")
        widths.append(int(w.shape[0]))
    model = VGG19Features(widths, taps)
    try:
        model.features.load_state_dict({k: v.to(torch.float32) for k, v in features.items()}, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise CorruptFileError(f"{where}: VGG19 weights do not fit the torchvision layout ({detail})") from e
    return model.eval()


def tiny_vgg19_state_dict(seed: int = 0, widths: Sequence[int] = TINY_VGG_WIDTHS) -> dict[str, torch.Tensor]:
    """A random torchvision-layout ``features.*`` state dict with ``widths`` (He-initialised convs, small biases)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    c_in = 3
    for i, c_out in zip(conv_indices(), widths):
        std = (2.0 / (c_in * 9)) ** 0.5
        out[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * std
        out[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.1
        c_in = c_out
    return out


class VggEncoder(Encoder):
    """VGG19 feature maps at conv1_1…conv5_1 (see module docstring), ImageNet normalisation; generated images keep
    their aspect with the shorter side at 224 (the official code's ``resize_rectangle`` for VGG)."""

    kind = "vgg19"
    generated_mode: ResizeMode = "resize_rectangle"

    def __init__(self, model: VGG19Features, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model.to(self.device).eval()

    def preprocessing(self, *, reference: bool = False, mode: ResizeMode | None = None) -> str:
        """As :meth:`Encoder.preprocessing`, plus the tap definition."""
        return f"{super().preprocessing(reference=reference, mode=mode)}:taps={self.model.taps}"

    def feature_maps(
        self, images: Sequence[Image.Image], *, reference: bool = False, mode: ResizeMode | None = None
    ) -> list[torch.Tensor]:
        """Feature maps of ``images`` (one batch; same size after preprocessing): 5 float32 CPU tensors
        (N, C_k, H_k, W_k) for conv1_1…conv5_1 (224-short-side input: 224, 112, 56, 28, 14 px)."""
        pixels = self.pixel_batch(images, reference=reference, mode=mode)
        with self._precision():
            maps = self.model(pixels)
        return [self._finite(m, f"{name} maps") for m, name in zip(maps, TAP_NAMES)]


def load_vgg19(
    path: Path | str | None,
    *,
    tiny: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    taps: VggTaps = "pre_relu",
    device: str | torch.device | None = None,
    autocast: bool | None = None,
) -> VggEncoder:
    """A VGG19 encoder from a torchvision ``vgg19`` state dict file (``.pth``/``.pt``/``.bin``/``.safetensors``),
    or a tiny random one (``tiny``)."""
    common: dict[str, Any] = {"image_size": image_size or VGG_IMAGE_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                              "device": pick_device(device), "autocast": autocast}
    if tiny:
        model = vgg19_from_state_dict(tiny_vgg19_state_dict(seed), "tiny vgg19", taps)
        ident = f"vgg19:tiny:{module_fingerprint(model)}:{taps}"
        return VggEncoder(model, identity=ident, source="tiny vgg19", **common)
    p = require_path(path, "vgg19")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".pth", ".pt", ".bin", ".safetensors"))
        if len(files) != 1:
            raise UnknownFormatError(f"{p}: expected one VGG19 weights file (.pth/.safetensors) in the folder, "
                                     f"found {len(files)}")
        p = files[0]
    model = vgg19_from_state_dict(_read_state_dict(p), str(p), taps)
    ident = f"vgg19:{p.name}:{file_fingerprint([p])}:{taps}"
    return VggEncoder(model, identity=ident, source=str(p), **common)


def write_tiny_vgg19(path: Path, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Save the tiny VGG19 ``features.*`` state dict (torchvision layout) as a safetensors file at ``path``."""
    from lyco_core.formats.safetensors_io import save_tensors

    save_tensors(path, tiny_vgg19_state_dict(seed), overwrite=overwrite)
    return path
