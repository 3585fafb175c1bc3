"""The algorithm registry: one table, in detection-priority order.

Everything that needs to know which algorithms exist (network creation, file reading, CLI help, error
messages) asks this module. Registration is explicit: the list below is the only place an algorithm is
added.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import InvalidConfigError, UnknownFormatError
from .base import AdapterOptions, Algorithm
from .boft import BOFT
from .dylora import DyLoRA
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import DiagOFT

#: Detection order matters: the first algorithm whose detector matches a module's tensors wins.
#: It follows LyCORIS's loader, so every file it reads is read the same way here. DyLoRA files use
#: LoRA names and are read as LoRA (that is also what every consumer does).
ALGORITHMS: tuple[Algorithm, ...] = (
    LoRA(),
    LoHa(),
    IA3(),
    LoKr(),
    Full(),
    Norm(),
    DiagOFT(),
    BOFT(),
    GLoRA(),
    DyLoRA(),
)

_BY_NAME: dict[str, Algorithm] = {}
for _algo in ALGORITHMS:
    for _n in (_algo.name, *_algo.aliases):
        if _n in _BY_NAME:
            raise RuntimeError(f"duplicate algorithm name {_n!r}")
        _BY_NAME[_n] = _algo


def names() -> list[str]:
    """Canonical algorithm names, in registry order."""
    return [a.name for a in ALGORITHMS]


def get(name: str) -> Algorithm:
    """The algorithm called ``name`` (or one of its aliases); an error lists the valid names."""
    key = name.strip().lower().replace("_", "-")
    if key not in _BY_NAME:
        raise InvalidConfigError(f"algo: unknown algorithm {name!r}; choose one of {', '.join(names())}")
    return _BY_NAME[key]


def detect(tensors: Mapping[str, torch.Tensor], key: str = "") -> Algorithm:
    """The algorithm a module's tensors belong to, or :class:`UnknownFormatError` naming the keys."""
    for algo in ALGORITHMS:
        if algo.matches(tensors):
            return algo
    raise UnknownFormatError(f"{key}: no algorithm uses the tensors {sorted(tensors)}")


__all__ = ["ALGORITHMS", "AdapterOptions", "Algorithm", "detect", "get", "names"]
