"""Small helpers shared by the algorithm tests."""

from __future__ import annotations

import torch
from torch import nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), detached; ‖b‖ is floored at 1e-30 so an exact zero compares as zero."""
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def make_input(layer: nn.Module) -> torch.Tensor:
    """A random input batch for a Linear (2×5 tokens), Conv1d (length 10) or Conv2d (6×6) layer."""
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 5, layer.in_features)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(2, layer.in_channels, 10)
    return torch.randn(2, layer.in_channels, 6, 6)


def state_dict_copy(m: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a module's state dict."""
    return {k: v.detach().clone() for k, v in m.state_dict().items()}
