"""DoRA weight decomposition, shared by LoRA, LoHa and LoKr.

With ``V = W + ΔW`` (ΔW includes α/r) and magnitude ``m`` (``dora_scale``), the decomposed weight is
``W_d = V · m / (‖V‖ + ε)``, the norm taken per output channel (``m`` of shape ``(O, 1, …)``) or per
input channel (``(1, I, 1, …)``), ε = float32 eps, computed in float32.

Lyco applies the multiplier μ as a strength on the whole change: ``W' = W + μ·(W_d − W)``, so μ=0 gives
the base weight exactly (LyCORIS gives ``W + ΔW`` there) and μ=1 equals LyCORIS, ComfyUI and A1111.
"""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def norm_axes(ndim: int, on_output: bool) -> tuple[int, ...]:
    """Axes the norm reduces over: all but 0 (per output) or all but 1 (per input)."""
    keep = 0 if on_output else 1
    return tuple(d for d in range(ndim) if d != keep)


def weight_norm(w: torch.Tensor, on_output: bool) -> torch.Tensor:
    """‖W‖ per output channel ``(O, 1, …)`` or per input channel ``(1, I, 1, …)``, in float32."""
    return torch.linalg.vector_norm(w.float(), dim=norm_axes(w.ndim, on_output), keepdim=True)


def init_magnitude(weight: torch.Tensor, on_output: bool) -> torch.Tensor:
    """Initial ``dora_scale`` = ‖W‖ along the chosen axis (so the decomposition starts at W)."""
    return weight_norm(weight, on_output)


def magnitude_on_output(m: torch.Tensor, weight_shape: tuple[int, ...] | None = None) -> bool:
    """Orientation of a stored ``dora_scale``: ``(O, 1, …)`` → output, ``(1, I, …)`` → input.

    ``weight_shape`` settles the ambiguous cases (a layer with one output, or with one input); without it
    the magnitude's own shape decides.
    """
    if m.ndim < 2 or m.shape[0] != 1:
        return True
    if weight_shape is None:
        return m.shape[1] == 1
    return not (m.shape[1] == weight_shape[1] and weight_shape[0] != 1)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``W_d = (W + ΔW)·m/(‖W + ΔW‖ + ε)`` in float32; orientation read from ``m``'s shape."""
    v = weight.float() + delta.float()
    on_output = magnitude_on_output(m, tuple(weight.shape))
    m = m.float().reshape(weight_norm(v, on_output).shape)
    return v * (m / (weight_norm(v, on_output) + EPS))


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``W + μ·(W_d − W)``, returned in ``weight``'s dtype."""
    wd = dora_weight(weight, delta, m)
    return (weight.float() + multiplier * (wd - weight.float())).to(weight.dtype)
