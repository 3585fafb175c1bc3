"""Parameter initialisers shared by the algorithms (the same rules LyCORIS uses)."""

from __future__ import annotations

import math

import torch
from torch import nn


def kaiming(*shape: int) -> torch.Tensor:
    """Kaiming-uniform with a=√5, the default init of ``nn.Linear``/``nn.Conv`` weights."""
    w = torch.empty(*shape)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return w


def normal(*shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape) * std


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape)
