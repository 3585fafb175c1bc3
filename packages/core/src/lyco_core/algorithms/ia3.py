"""(IA)³: learned per-channel rescaling of the weight, ``W' = W ⊙ (1 + μ·w)``.

Tensors (LyCORIS names; there is no alpha, ``dim`` and ``alpha`` are ignored):

* Linear: ``weight (O,)``, or ``(I,)`` when trained on the input side.
* Conv: ``weight (1, C, 1…)`` with ``C = O`` (output side) or ``C = in_channels`` (input side); this is
  the layout LyCORIS 4.1.3 writes (its merge broadcasts ``(1, C, 1…)`` against ``Wᵀ`` for the output
  side and against ``W`` for the input side).
* ``on_input ()``: 0 (scale output channels) or 1 (scale input channels). Stored as int64, but a file
  may hold it in any dtype (LyCORIS casts every tensor on save), so it is read as a number.

Lyco semantics differ from LyCORIS in one place: LyCORIS's bypass mode scales the layer's bias too on
the output side, its rebuild mode does not. Here both paths leave the bias alone, so that bypass and
merge agree exactly. For grouped convs the input-side vector is expanded per group (LyCORIS cannot
merge that case at all).
"""

from __future__ import annotations

import torch

from ..errors import CorruptFileError, IncompatibleBaseError
from ..layers import LayerInfo
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors

WEIGHT, ON_INPUT = "weight", "on_input"


def ia3_on_input(t: Tensors) -> bool:
    """The stored side flag: True when the input channels are scaled."""
    return bool(round(float(t[ON_INPUT].float().item())))


def ia3_channels(layer: LayerInfo, on_input: bool) -> int:
    """Length C of the (IA)³ vector: ``O``, or the layer's full input channel count."""
    return layer.in_features * layer.groups if on_input else layer.out_features


def ia3_weight_view(w: torch.Tensor, weight_shape: tuple[int, ...], on_input: bool, groups: int = 1) -> torch.Tensor:
    """Reshape the vector ``w`` (any shape with C elements) to broadcast against ``W (O, I/g, *k)``.

    Output side: ``(O, 1, 1…)``. Input side: ``(1, I, 1…)``; for a grouped conv ``(O, I/g, 1…)``, where
    row ``o`` holds the entries of the input channels that output channel ``o``'s group reads.
    """
    v = w.reshape(-1)
    ones = [1] * (len(weight_shape) - 2)
    if not on_input:
        return v.reshape(-1, 1, *ones)
    if groups == 1:
        return v.reshape(1, -1, *ones)
    o, i_g = weight_shape[0], weight_shape[1]
    per_group = v.reshape(groups, 1, i_g).expand(groups, o // groups, i_g)
    return per_group.reshape(o, i_g, *ones)


def ia3_merge(
    weight: torch.Tensor, w: torch.Tensor, on_input: bool, multiplier: float, groups: int = 1
) -> torch.Tensor:
    """``W ⊙ (1 + μ·w)``, broadcast along the output or input axis; same shape and dtype as ``weight``."""
    view = ia3_weight_view(w.to(weight.dtype), tuple(weight.shape), on_input, groups)
    return weight * (1 + multiplier * view)


def ia3_delta(weight: torch.Tensor, w: torch.Tensor, on_input: bool, groups: int = 1) -> torch.Tensor:
    """``ΔW = W ⊙ w`` (broadcast), so that ``W' = W + μ·ΔW``."""
    return weight * ia3_weight_view(w.to(weight.dtype), tuple(weight.shape), on_input, groups)


def ia3_bypass(
    x: torch.Tensor,
    base_out: torch.Tensor,
    w: torch.Tensor,
    on_input: bool,
    multiplier: float,
    layer: LayerInfo,
    base_weight: torch.Tensor | None,
    base_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The layer output at μ without building ``W'``.

    Output side: ``y = base_out + μ·w ⊙ (base_out − b)``, i.e. ``f(x;W)·(1+μw) + b`` (elementwise only).
    Input side: ``y = base_out + f(x ⊙ μw; W)`` without bias: one extra layer op on the input scaled per
    channel, which equals running the layer with ``W ⊙ (1 + μw)`` along the input axis.
    """
    v = w.reshape(-1).to(x.dtype)
    if not on_input:
        unbiased = base_out if base_bias is None else base_out - layer.channel_view(base_bias.to(base_out.dtype))
        return base_out + unbiased * layer.channel_view(multiplier * v.to(base_out.dtype))
    if base_weight is None:
        raise ValueError("ia3: the input-side bypass needs base_weight")
    return base_out + layer.forward(x * layer.channel_view(multiplier * v), base_weight.to(x.dtype))


class IA3(Algorithm):
    name = "ia3"
    description = "(IA)³: per-channel rescaling W ⊙ (1 + w) of the output or input side"
    detector_keys = (ON_INPUT,)
    tensor_names = (WEIGHT, ON_INPUT)
    frozen_names = frozenset({ON_INPUT})
    needs_base_weight = True
    #: the output-side bypass is a single elementwise product on the activation
    default_bypass = True
    additive = False

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        on_input = opts.train_on_input
        c = ia3_channels(layer, on_input)
        shape = (c,) if layer.kind == "linear" else (1, c, *([1] * layer.ndim_spatial))
        return {WEIGHT: torch.zeros(shape), ON_INPUT: torch.tensor(int(on_input), dtype=torch.int64)}

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("ia3: delta_weight needs the base weight")
        return ia3_delta(base_weight, t[WEIGHT], ia3_on_input(t), layer.groups)

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
        """``W ⊙ (1 + μw)``; the bias is unchanged.

        ``row_mask`` is unused: rank dropout does not apply to this multiplicative algorithm.
        """
        return ia3_merge(weight, t[WEIGHT], ia3_on_input(t), multiplier, layer.groups), bias

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
        """See :func:`ia3_bypass`. ``base_bias`` is required for a biased layer on the output side."""
        on_input = ia3_on_input(t)
        if not on_input and layer.has_bias and base_bias is None:
            raise ValueError("ia3: the output-side bypass of a layer with a bias needs base_bias")
        return ia3_bypass(x, base_out, t[WEIGHT], on_input, multiplier, layer, base_weight, base_bias)

    def describe(self, t: Tensors) -> dict[str, object]:
        out = super().describe(t)
        out["on_input"] = ia3_on_input(t)
        return out

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        for name in (WEIGHT, ON_INPUT):
            if name not in t:
                raise CorruptFileError(f"{key}.{name}: missing from this {self.name} module")
        if t[ON_INPUT].numel() != 1 or float(t[ON_INPUT].float().reshape(-1)[0]) not in (0.0, 1.0):
            raise CorruptFileError(f"{key}.{ON_INPUT}: must be a single 0 or 1")
        on_input = ia3_on_input(t)
        c = ia3_channels(layer, on_input)
        w = t[WEIGHT]
        if w.numel() != c or sum(s != 1 for s in w.shape) > 1:
            side = "input" if on_input else "output"
            raise IncompatibleBaseError(
                f"{key}.{WEIGHT}: shape {tuple(w.shape)} does not hold one value per {side} channel ({c})"
            )
