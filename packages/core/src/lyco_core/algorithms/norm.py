"""Norm-layer fine-tune: additive changes to a LayerNorm/GroupNorm/RMSNorm affine weight and bias.

Tensors (LyCORIS names): ``w_norm (C,)`` and ``b_norm (C,)`` (only when the layer has a bias);
``W' = W + μ·w_norm``, ``b' = b + μ·b_norm``. No alpha, no rank.

Only the math lives here: norm layers have no linear operation in :class:`~lyco_core.layers.LayerInfo`,
so the module wrapper runs the norm op itself (with the merged affine parameters, or as
``y = f(x) + μ·(normed(x)·w_norm + b_norm)``, which is the same thing because the affine step is linear).
"""

from __future__ import annotations

import torch

from ..errors import CorruptFileError, IncompatibleBaseError, UnsupportedLayerError
from ..layers import LayerInfo
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors

W_NORM, B_NORM = "w_norm", "b_norm"


def norm_merge(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w_norm: torch.Tensor,
    b_norm: torch.Tensor | None,
    multiplier: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W + μ·w_norm, b + μ·b_norm)`` for affine parameters of shape ``(C,)``.

    A missing base bias counts as zero when ``b_norm`` is given; without ``b_norm`` the bias is returned
    unchanged.
    """
    new_w = weight + multiplier * w_norm.reshape(weight.shape).to(weight.dtype)
    if b_norm is None:
        return new_w, bias
    base_b = bias if bias is not None else torch.zeros_like(weight)
    return new_w, base_b + multiplier * b_norm.reshape(base_b.shape).to(base_b.dtype)


class Norm(Algorithm):
    name = "norm"
    description = "norm layers: additive change to the affine weight and bias"
    layer_kinds = frozenset({"norm"})
    detector_keys = (W_NORM,)
    tensor_names = (W_NORM, B_NORM)
    frozen_names = frozenset()

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Zero ``w_norm`` (and ``b_norm`` when the layer has a bias)."""
        c = layer.out_features
        t = {W_NORM: torch.zeros(c)}
        if layer.has_bias:
            t[B_NORM] = torch.zeros(c)
        return t

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return t[W_NORM].reshape(layer.weight_shape)

    def delta_bias(self, t: Tensors, layer: LayerInfo) -> torch.Tensor | None:
        return t.get(B_NORM)

    def merge(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t: Tensors,
        layer: LayerInfo,
        multiplier: float = 1.0,
        *,
        row_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W + μ·w_norm``, ``b + μ·b_norm``; a norm layer has no ranks, so ``row_mask`` does not apply."""
        return norm_merge(weight, bias, t[W_NORM], t.get(B_NORM), multiplier)

    def bypass(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        t: Tensors,
        layer: LayerInfo,
        multiplier: float = 1.0,
        *,
        base_weight: torch.Tensor | None = None,
        base_bias: torch.Tensor | None = None,
        hidden_hook: HiddenHook | None = None,
    ) -> torch.Tensor:
        """Not available: the norm op belongs to the module wrapper, which runs it with :meth:`merge`."""
        raise UnsupportedLayerError("norm: the wrapper runs the norm op with the merged affine parameters")

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        if W_NORM not in t:
            raise CorruptFileError(f"{key}.{W_NORM}: missing from this {self.name} module")
        c = layer.out_features
        for name in (W_NORM, B_NORM):
            if name in t and tuple(t[name].shape) != (c,):
                raise IncompatibleBaseError(f"{key}.{name}: shape {tuple(t[name].shape)}, the layer has {c} channels")
