"""lyco_core: every LyCORIS adapter algorithm, attachable to any torch model, with ecosystem-exact files.

Depends on torch, safetensors, numpy and pydantic only.

Quick start::

    import lyco_core as lc
    net = lc.create_network({"unet": unet, "te": text_encoder}, algo="lokr", preset="attn-mlp", dim=8, factor=8)
    net.apply()                                  # adapters run in the model's forward
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
    ...
    net.save("my_adapter.safetensors")           # kohya/LyCORIS keys, Lyco + ss_* + modelspec metadata
    net2, report = lc.load_network("my_adapter.safetensors", {"unet": unet, "te": text_encoder})
    w_new, b_new = lc.read_adapter("my_adapter.safetensors").modules[key].merge(weight, bias)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import algorithms
from .algorithms.base import AdapterOptions, Algorithm
from .errors import (
    CorruptFileError,
    IncompatibleBaseError,
    InvalidConfigError,
    LycoError,
    NotFoundError,
    UnknownFormatError,
    UnsupportedLayerError,
)
from .files import AdapterFile, ModuleTensors, read_adapter, save_adapter
from .layers import LayerInfo
from .network.module import AdapterModule
from .network.network import AdapterNetwork, LoadReport, NetworkConfig, create_network, network_from_tensors
from .network.targeting import Preset, builtin_presets, load_preset

__version__ = "0.1.0"


def load_network(
    path: str | Path,
    model: nn.Module | dict[str, nn.Module],
    *,
    multiplier: float = 1.0,
    strict: bool = True,
) -> tuple[AdapterNetwork, LoadReport]:
    """Load an adapter file onto ``model`` (not applied yet: call ``.apply()`` or ``.merge()``)."""
    from .formats.safetensors_io import load_tensors

    tensors = load_tensors(path)
    return network_from_tensors(tensors, model, multiplier=multiplier, strict=strict, source=str(path))


__all__ = [
    "AdapterFile",
    "AdapterModule",
    "AdapterNetwork",
    "AdapterOptions",
    "Algorithm",
    "CorruptFileError",
    "IncompatibleBaseError",
    "InvalidConfigError",
    "LayerInfo",
    "LoadReport",
    "LycoError",
    "ModuleTensors",
    "NetworkConfig",
    "NotFoundError",
    "Preset",
    "UnknownFormatError",
    "UnsupportedLayerError",
    "__version__",
    "algorithms",
    "builtin_presets",
    "create_network",
    "load_network",
    "load_preset",
    "network_from_tensors",
    "read_adapter",
    "save_adapter",
]

