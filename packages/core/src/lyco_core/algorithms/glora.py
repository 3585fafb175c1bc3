"""GLoRA: ΔW = (α/r)·(W·A + B), with low-rank A = a1·a2 acting on the input axis and B = b1·b2.

Tensors (LyCORIS names):

* Linear: ``a1.weight (I, r)``, ``a2.weight (r, I)``, ``b1.weight (O, r)``, ``b2.weight (r, I)``, ``alpha ()``.
* Conv: ``a1.weight (I, r, 1…)``, ``a2.weight (r, I, 1…)``, ``b1.weight (O, r, 1…)``, ``b2.weight (r, I, *k)``.

``r = a2.shape[0]``; ``A = a1₂ᴅ @ a2₂ᴅ`` has shape ``(I, I)`` and ``(W·A)[o, j, …] = Σ_i W[o, i, …]·A[i, j]``.
``alpha`` may be int64 in LyCORIS files and is always cast. LyCORIS never writes its Tucker core
``bm.weight`` (the option cannot switch on), so a file holding one is rejected.

Differences from LyCORIS (deliberate):

* ``use_scalar`` is unsupported: LyCORIS folds its scalar into *two* tensors (a2 and b2), Lyco's module
  folds into one ``scalar_target``.
* With ``rs_lora`` the stored alpha is ``α·√r`` (as for LoRA) so that every consumer's ``α_file/r``
  reproduces ``α/√r``; LyCORIS stores the raw α there.
* The bypass path runs ``b2`` with the layer's dilation as well (LyCORIS's ``b2`` conv drops it, so its
  bypass and rebuild modes differ on dilated convs).
* Grouped convs are rejected: ``W·A`` mixes channels across groups and has no grouped weight.
"""

from __future__ import annotations

import math

import torch

from ..errors import CorruptFileError, IncompatibleBaseError, UnsupportedLayerError
from ..layers import LayerInfo
from . import init
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors, alpha_tensor, flat2d

A1, A2, B1, B2 = "a1.weight", "a2.weight", "b1.weight", "b2.weight"
TUCKER = "bm.weight"


def glora_delta(
    weight: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, scale: float
) -> torch.Tensor:
    """``ΔW = scale·(W·a1·a2 + b1·b2)`` with ``weight (O, I, *k)``; returns ``weight``'s shape.

    ``a1`` flattens to ``(I, r)``, ``a2`` to ``(r, I)``, ``b1`` to ``(O, r)``, ``b2`` to ``(r, I·∏k)``.
    ``W·a1`` is contracted first (``O·I·r`` work) so the ``(I, I)`` matrix A is never built.
    """
    wa = torch.einsum("oi...,ir->or...", weight, flat2d(a1).to(weight.dtype))
    wa = torch.einsum("or...,ri->oi...", wa, flat2d(a2).to(weight.dtype))
    wb = (flat2d(b1).to(weight.dtype) @ flat2d(b2).to(weight.dtype)).reshape(weight.shape)
    return scale * (wa + wb)


def glora_bypass(
    x: torch.Tensor,
    weight: torch.Tensor,
    a1: torch.Tensor,
    a2: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    scale: float,
    layer: LayerInfo,
    hidden_hook: HiddenHook | None = None,
) -> torch.Tensor:
    """The adapter's contribution ``scale·[f(a1(a2(x)); W) + b1(b2(x))]``, never building ΔW.

    ``a2``/``a1`` are pointwise (linear or 1×1 conv) maps of the input channels, then the base weight
    runs (without bias) with the layer's own conv arguments; ``b2`` carries the layer's
    stride/padding/dilation and ``b1`` is pointwise. ``hidden_hook`` is applied to both rank-r
    activations. Returns the layer's output layout.
    """
    dtype = x.dtype
    r, i = a2.shape[0], a1.shape[0]
    ones = [1] * layer.ndim_spatial
    if layer.kind == "linear":
        ha = torch.nn.functional.linear(x, flat2d(a2).to(dtype))
        hb = torch.nn.functional.linear(x, flat2d(b2).to(dtype))
    else:
        ha = layer.forward_with(x, a2.reshape(r, i, *ones).to(dtype), pointwise=True)
        hb = layer.forward_with(x, b2.to(dtype), groups=1)
    if hidden_hook is not None:
        ha, hb = hidden_hook(ha), hidden_hook(hb)
    if layer.kind == "linear":
        ax = torch.nn.functional.linear(ha, flat2d(a1).to(dtype) * scale)
        bx = torch.nn.functional.linear(hb, flat2d(b1).to(dtype) * scale)
    else:
        ax = layer.forward_with(ha, a1.reshape(i, r, *ones).to(dtype) * scale, pointwise=True)
        bx = layer.forward_with(hb, b1.reshape(b1.shape[0], r, *ones).to(dtype) * scale, pointwise=True)
    return layer.forward(ax, weight.to(dtype)) + bx


class GLoRA(Algorithm):
    name = "glora"
    description = "generalised LoRA: ΔW = W·(a1·a2) + b1·b2 (needs the base weight)"
    detector_keys = (A1,)
    tensor_names = (A1, A2, B1, B2, "alpha")
    needs_base_weight = True
    default_bypass = True

    def check_options(self, opts: AdapterOptions, layer: LayerInfo) -> None:
        super().check_options(opts, layer)
        if layer.groups != 1:
            raise UnsupportedLayerError(f"{self.name} does not support grouped convolutions (groups={layer.groups})")

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """a1, b1 Kaiming-uniform; a2, b2 zero (ΔW = 0). Alpha as LoRA stores it (rs-LoRA: α·√r)."""
        self.check_options(opts, layer)
        r, o, i = opts.dim, layer.out_features, layer.in_features
        ones = (1,) * layer.ndim_spatial
        alpha = opts.effective_alpha()
        return {
            A1: init.kaiming(i, r, *ones),
            A2: init.zeros(r, i, *ones),
            B1: init.kaiming(o, r, *ones),
            B2: init.zeros(r, i, *layer.kernel_size),
            "alpha": alpha_tensor(alpha * r / math.sqrt(r) if opts.rs_lora else alpha),
        }

    def rank(self, t: Tensors) -> int:
        return int(t[A2].shape[0])

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("glora: delta_weight needs the base weight")
        w = base_weight.reshape(layer.weight_shape)
        return glora_delta(w, t[A1], t[A2], t[B1], t[B2], self.scale(t))

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
        """``base_out + μ·(α/r)·[f(a1(a2(x)); W) + b1(b2(x))]`` (see :func:`glora_bypass`)."""
        if base_weight is None:
            raise ValueError("glora: bypass needs base_weight")
        scale = multiplier * self.scale(t)
        return base_out + glora_bypass(
            x, base_weight.reshape(layer.weight_shape), t[A1], t[A2], t[B1], t[B2], scale, layer, hidden_hook
        )

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        if layer.groups != 1:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a grouped conv")
        if TUCKER in t:
            raise CorruptFileError(f"{key}.{TUCKER}: a GLoRA Tucker core is not supported (LyCORIS never writes one)")
        for name in (A1, A2, B1, B2):
            if name not in t:
                raise CorruptFileError(f"{key}.{name}: missing from this {self.name} module")
        a1, a2, b1, b2 = (flat2d(t[n]) if t[n].ndim >= 2 else t[n] for n in (A1, A2, B1, B2))
        if any(m.ndim != 2 for m in (a1, a2, b1, b2)):
            raise CorruptFileError(f"{key}: {self.name} factors must have at least 2 dimensions")
        r = a2.shape[0]
        for name, got in ((A1, a1.shape[1]), (B1, b1.shape[1]), (B2, b2.shape[0])):
            if got != r:
                raise CorruptFileError(f"{key}.{name}: rank {got} does not match {A2} rank {r}")
        o, i = layer.out_features, layer.in_features
        expected = {A1: (i, r), A2: (r, i), B1: (o, r), B2: (r, i * layer.kernel_numel)}
        for name, m in zip((A1, A2, B1, B2), (a1, a2, b1, b2)):
            if tuple(m.shape) != expected[name]:
                raise IncompatibleBaseError(
                    f"{key}.{name}: shape {tuple(t[name].shape)} does not fit the layer's weight {layer.weight_shape}"
                )
        if layer.kind == "conv" and tuple(t[B2].shape) != (r, i, *layer.kernel_size):
            raise IncompatibleBaseError(
                f"{key}.{B2}: shape {tuple(t[B2].shape)}, expected {(r, i, *layer.kernel_size)} for this conv"
            )
