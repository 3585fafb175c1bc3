"""LoHa: ΔW = (α/r)·(w1_a·w1_b) ⊙ (w2_a·w2_b), a Hadamard product of two low-rank matrices.

Tensors (LyCORIS names):

* Linear, and convs without Tucker: ``hada_w1_a (O, r)``, ``hada_w1_b (r, I·∏k)`` (flattened 2-D for
  convs), ``hada_w2_a (O, r)``, ``hada_w2_b (r, I·∏k)``, ``alpha ()``.
* Conv + Tucker (some k≠1): ``hada_t1 (r, r, *k)``, ``hada_t2 (r, r, *k)``, ``hada_w1_a (r, O)``,
  ``hada_w1_b (r, I)``, ``hada_w2_a (r, O)``, ``hada_w2_b (r, I)``; the a-factors are *transposed* with
  respect to the plain layout. Each half is ``P_i[o,c,…] = Σ_{p,q} t_i[p,q,…]·wi_a[p,o]·wi_b[q,c]``.
* Optional ``dora_scale`` (see :mod:`.dora`).

``r = hada_w1_b.shape[0]``. rs-LoRA stores ``α·√r`` so that ``α_file/r`` equals ``α/√r`` (as LoRA does).

The rebuild runs through custom autograd functions that save only the factors and recompute the two
Hadamard halves in backward, so training keeps no ``(O, I·∏k)`` intermediates alive between forward and
backward. Unlike LyCORIS's ``merge_to`` (which applies α/r twice), the scale is applied exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

from ..errors import CorruptFileError, IncompatibleBaseError
from ..layers import LayerInfo
from . import init
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors, alpha_tensor, flat2d
from .lora import lora_bypass
from .tucker import rebuild_tucker

W1A, W1B, W2A, W2B = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"
T1, T2 = "hada_t1", "hada_t2"


# --------------------------------------------------------------------------------------- autograd functions
class HadaProduct(torch.autograd.Function):
    """``scale·(w1a @ w1b) ⊙ (w2a @ w2b)`` with ``w*a (O, r)``, ``w*b (r, M)`` → ``(O, M)``.

    Saves only the four factors; backward recomputes the half it needs.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        w1a: torch.Tensor,
        w1b: torch.Tensor,
        w2a: torch.Tensor,
        w2b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale  # type: ignore[attr-defined]
        out = w1a @ w1b
        out.mul_(w2a @ w2b)
        return out.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        scale: float = ctx.scale
        need = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = None
        if need[0] or need[1]:
            d1 = (w2a @ w2b).mul_(grad)  # ∂L/∂P1 / scale, in a fresh buffer
            g1a = (d1 @ w1b.T).mul_(scale) if need[0] else None
            g1b = (w1a.T @ d1).mul_(scale) if need[1] else None
            del d1
        if need[2] or need[3]:
            d2 = (w1a @ w1b).mul_(grad)
            g2a = (d2 @ w2b.T).mul_(scale) if need[2] else None
            g2b = (w2a.T @ d2).mul_(scale) if need[3] else None
        return g1a, g1b, g2a, g2b, None


def _tucker_grads(
    core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, scale: float, need: tuple[bool, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``P[o,c,k] = Σ_{p,q} core[p,q,k]·a[p,o]·b[q,c]`` given ``d = ∂L/∂P / scale``.

    ``core (r1, r2, *k)``, ``a (r1, O)``, ``b (r2, I)``, ``d (O, I, *k)``; ``need`` = (core, a, b).
    """
    r1, r2 = core.shape[:2]
    c3 = core.reshape(r1, r2, -1)
    d3 = d.reshape(d.shape[0], d.shape[1], -1)
    g_core = g_a = g_b = None
    if need[0] or need[1]:
        x = torch.einsum("ock,qc->oqk", d3, b)  # (O, r2, K)
        if need[0]:
            g_core = torch.einsum("po,oqk->pqk", a, x).mul_(scale).reshape(core.shape)
        if need[1]:
            g_a = torch.einsum("pqk,oqk->po", c3, x).mul_(scale)
    if need[2]:
        y = torch.einsum("po,ock->pck", a, d3)  # (r1, I, K)
        g_b = torch.einsum("pqk,pck->qc", c3, y).mul_(scale)
    return g_core, g_a, g_b


class HadaTuckerProduct(torch.autograd.Function):
    """``scale·P1 ⊙ P2`` with ``P_i = rebuild_tucker(t_i, wi_a, wi_b)`` → ``(O, I, *k)``.

    ``t_i (r, r, *k)``, ``wi_a (r, O)``, ``wi_b (r, I)``. Saves only the six factors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        t1: torch.Tensor,
        w1a: torch.Tensor,
        w1b: torch.Tensor,
        t2: torch.Tensor,
        w2a: torch.Tensor,
        w2b: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        ctx.scale = scale  # type: ignore[attr-defined]
        out = rebuild_tucker(t1, w1a, w1b)
        out.mul_(rebuild_tucker(t2, w2a, w2b))
        return out.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
        scale: float = ctx.scale
        need = ctx.needs_input_grad
        g1: tuple[torch.Tensor | None, ...] = (None, None, None)
        g2: tuple[torch.Tensor | None, ...] = (None, None, None)
        if any(need[0:3]):
            d1 = rebuild_tucker(t2, w2a, w2b).mul_(grad)
            g1 = _tucker_grads(t1, w1a, w1b, d1, scale, need[0:3])
            del d1
        if any(need[3:6]):
            d2 = rebuild_tucker(t1, w1a, w1b).mul_(grad)
            g2 = _tucker_grads(t2, w2a, w2b, d2, scale, need[3:6])
        return (*g1, *g2, None)


# --------------------------------------------------------------------------------------- pure math
def loha_delta(
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: float,
    weight_shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW = scale·(w1a @ w1b) ⊙ (w2a @ w2b), reshaped to ``weight_shape`` ``(O, I, *k)``.

    ``w*a (O, r)``, ``w*b (r, I·∏k)`` (any trailing singleton/kernel axes are flattened first).
    """
    out = HadaProduct.apply(flat2d(w1a), flat2d(w1b), flat2d(w2a), flat2d(w2b), float(scale))
    return out.reshape(weight_shape)


def loha_delta_tucker(
    t1: torch.Tensor,
    w1a: torch.Tensor,
    w1b: torch.Tensor,
    t2: torch.Tensor,
    w2a: torch.Tensor,
    w2b: torch.Tensor,
    scale: float,
    weight_shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW = scale·P1 ⊙ P2 with ``P_i[o,c,*k] = Σ_{p,q} t_i[p,q,*k]·wi_a[p,o]·wi_b[q,c]``.

    ``t_i (r, r, *k)``, ``wi_a (r, O)``, ``wi_b (r, I)`` → ``weight_shape`` ``(O, I, *k)``.
    """
    out = HadaTuckerProduct.apply(t1, w1a, w1b, t2, w2a, w2b, float(scale))
    return out.reshape(weight_shape)


# --------------------------------------------------------------------------------------- algorithm
def loha_lowrank_factors(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w1a@w1b) ⊙ (w2a@w2b) = U @ D`` with ``U (O, r1·r2)`` and ``D (r1·r2, I·∏k)`` (face-splitting products).

    ``w1a (O, r1)``, ``w1b (r1, I·∏k)``, ``w2a (O, r2)``, ``w2b (r2, I·∏k)``. Exact; differentiable.
    """
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    return up, down


def _factorised_is_cheaper(t: Tensors, layer: LayerInfo) -> bool:
    """Multiply-adds per output position: rank-R path ``R·(I·∏k + O)`` vs the ΔW op ``O·I·∏k``."""
    rank = t[W1B].shape[0] * t[W2B].shape[0]
    ik = layer.in_features * layer.kernel_numel
    return rank * (ik + layer.out_features) < layer.out_features * ik


class LoHa(Algorithm):
    name = "loha"
    description = "Hadamard product of two low-rank matrices, ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) (Tucker optional)"
    detector_keys = (W1A,)
    tensor_names = (W1A, W1B, W2A, W2B, T1, T2, "alpha", "dora_scale")
    scalar_target = W1A
    supports_dora = True
    default_bypass = True

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """w1_b, w2_b ~ N(0,1); w1_a ~ N(0,0.1); w2_a = 0 (N(0,0.1) with use_scalar); t ~ N(0,0.1)."""
        r, o, i = opts.dim, layer.out_features, layer.in_features
        t: dict[str, torch.Tensor] = {}
        if opts.use_tucker and layer.kind == "conv" and not layer.is_pointwise:
            t[T1] = init.normal(r, r, *layer.kernel_size, std=0.1)
            t[T2] = init.normal(r, r, *layer.kernel_size, std=0.1)
            a_shape, b_shape = (r, o), (r, i)
        else:
            a_shape, b_shape = (o, r), (r, i * layer.kernel_numel)
        t[W1A] = init.normal(*a_shape, std=0.1)
        t[W1B] = init.normal(*b_shape, std=1.0)
        t[W2A] = init.normal(*a_shape, std=0.1) if opts.use_scalar else init.zeros(*a_shape)
        t[W2B] = init.normal(*b_shape, std=1.0)
        alpha = opts.effective_alpha()
        t["alpha"] = alpha_tensor(alpha * r / math.sqrt(r) if opts.rs_lora else alpha)
        return t

    def rank(self, t: Tensors) -> int:
        return int(t[W1B].shape[0])

    def _delta(self, t: Tensors, layer: LayerInfo, scale: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale·P1 ⊙ P2`` of shape ``layer.weight_shape`` in ``dtype`` (default: ``hada_w1_b``'s dtype)."""
        dtype = dtype or t[W1B].dtype
        f = [t[k].to(dtype) for k in (W1A, W1B, W2A, W2B)]
        if T1 in t:
            return loha_delta_tucker(
                t[T1].to(dtype), f[0], f[1], t[T2].to(dtype), f[2], f[3], scale, layer.weight_shape
            )
        return loha_delta(f[0], f[1], f[2], f[3], scale, layer.weight_shape)

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self._delta(t, layer, self.scale(t))

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
        """``f(x) + μ·ΔW(x)``, through a rank-r² factorisation of the Hadamard product when that is cheaper.

        ``(w1a@w1b) ⊙ (w2a@w2b) = U @ D`` exactly, with ``U[o,(i,j)] = w1a[o,i]·w2a[o,j]`` (O × r1·r2) and
        ``D[(i,j),c] = w1b[i,c]·w2b[j,c]`` (r1·r2 × I·∏k) (face-splitting products). So a LoHa module runs as a
        LoRA of rank r1·r2 on the activations, which avoids the full-size weight gradient a rebuilt ΔW costs
        in training. Tucker and grouped convs, and layers where r1·r2 is not small next to the layer, rebuild
        ΔW once and run one extra layer op instead. ``hidden_hook`` acts on the rank-r1·r2 hidden activation,
        or on the output channels of the adapter's part when ΔW is rebuilt (= masking ΔW's output rows).
        """
        scale = multiplier * self.scale(t)
        if T1 not in t and layer.groups == 1 and _factorised_is_cheaper(t, layer):
            up, down = loha_lowrank_factors(t[W1A].to(x.dtype), t[W1B].to(x.dtype), t[W2A].to(x.dtype),
                                            t[W2B].to(x.dtype))
            down = down.reshape(down.shape[0], layer.in_features, *layer.kernel_size)
            return lora_bypass(x, down, up, None, scale, layer, hidden_hook, base_out)
        c = layer.forward(x, self._delta(t, layer, scale, x.dtype))
        return base_out + (c if hidden_hook is None else hidden_hook(c))

    # ----------------------------------------------------------------------------- file facts
    def describe(self, t: Tensors) -> dict[str, object]:
        out = super().describe(t)
        if T1 in t:
            out["tucker"] = True
        return out

    def implied_weight_shape(self, t: Tensors) -> tuple[int, ...] | None:
        if any(k not in t or t[k].ndim != 2 for k in (W1A, W1B)):
            return None
        if T1 in t:
            return (int(t[W1A].shape[1]), int(t[W1B].shape[1]), *map(int, t[T1].shape[2:]))
        return (int(t[W1A].shape[0]), int(t[W1B].shape[1]))

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        """Check the factors against each other (CorruptFileError) and the layer (IncompatibleBaseError).

        Works on shapes only; ΔW is never built.
        """
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        tucker = T1 in t or T2 in t
        required = (W1A, W1B, W2A, W2B, *((T1, T2) if tucker else ()))
        missing = [k for k in required if k not in t]
        if missing:
            raise CorruptFileError(f"{key}: {self.name} module lacks {', '.join(missing)}")
        halves = [_half_shape(t, n, tucker, key) for n in ("1", "2")]
        if halves[0] != halves[1]:
            raise CorruptFileError(
                f"{key}: the two LoHa halves disagree ({W1A}/{W1B} give {halves[0]}, {W2A}/{W2B} give {halves[1]})"
            )
        if t[W1B].shape[0] != t[W2B].shape[0]:
            raise CorruptFileError(f"{key}: {W1B} has rank {t[W1B].shape[0]} but {W2B} has rank {t[W2B].shape[0]}")
        o, i, *k = halves[0]
        if tucker:
            expected = layer.weight_shape
            got: tuple[int, ...] = (o, i, *k)
        else:
            expected = (layer.out_features, layer.in_features * layer.kernel_numel)
            got = (o, i)
        if tucker and layer.kind != "conv":
            raise IncompatibleBaseError(f"{key}: a Tucker LoHa ({T1}) cannot be applied to a {layer.kind} layer")
        if got != expected:
            raise IncompatibleBaseError(
                f"{key}: {self.name} weight change has shape {got}, the layer's weight is {layer.weight_shape}"
            )


def _half_shape(t: Tensors, n: str, tucker: bool, key: str) -> tuple[int, ...]:
    """Shape ``(O, M)`` (plain) or ``(O, I, *k)`` (Tucker) of half ``n`` from its factors' shapes."""
    a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
    if not tucker:
        a_s, b_s = flat2d(a).shape, flat2d(b).shape
        if a_s[1] != b_s[0]:
            raise CorruptFileError(f"{key}: hada_w{n}_a {tuple(a.shape)} does not fit hada_w{n}_b {tuple(b.shape)}")
        return (a_s[0], b_s[1])
    core = t[f"hada_t{n}"]
    if a.ndim != 2 or b.ndim != 2 or core.ndim < 3 or core.shape[0] != a.shape[0] or core.shape[1] != b.shape[0]:
        raise CorruptFileError(
            f"{key}: hada_t{n} {tuple(core.shape)}, hada_w{n}_a {tuple(a.shape)} and hada_w{n}_b "
            f"{tuple(b.shape)} do not fit together"
        )
    return (a.shape[1], b.shape[1], *core.shape[2:])
