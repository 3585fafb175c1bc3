"""LoKr: ΔW = s·kron(w1, w2), each half full or low-rank (spec §2.3).

Tensors (LyCORIS names; ``O = O₁·O₂``, ``I = I₁·I₂``, ``k`` the kernel, empty for Linear):

* first half: ``lokr_w1 (O₁, I₁)``, or ``lokr_w1_a (O₁, r)`` + ``lokr_w1_b (r, I₁)`` (``decompose_both``);
* second half: ``lokr_w2 (O₂, I₂, *k)``, or ``lokr_w2_a (O₂, r)`` + ``lokr_w2_b (r, I₂·∏k)`` (flattened
  for convs), or, Tucker on a k×k conv, ``lokr_t2 (r, r, *k)`` + ``lokr_w2_a (r, O₂)`` + ``lokr_w2_b (r, I₂)``;
* ``alpha ()`` and optionally ``dora_scale``.

Element-wise ``ΔW[a·O₂+b, c·I₂+d, …] = s·w1[a,c]·w2[b,d,…]``. The scale is ``s = α/r`` with r from
``lokr_w2_b`` (else ``lokr_w1_b``); when neither half is decomposed ``s = 1`` and the file's alpha holds
``dim``. Files never store the factor, so everything here is read from tensor shapes alone (that includes
Tucker, ``decompose_both`` with any factor and full-matrix files, which LyCORIS's own loader cannot reload).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import CorruptFileError, IncompatibleBaseError
from ..layers import LayerInfo
from . import init
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors, alpha_tensor, flat2d
from .factorization import factorize
from .tucker import rebuild_tucker

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B, T2 = "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


# ----------------------------------------------------------------------------------------- pure math
class W2Factors(NamedTuple):
    """The second Kronecker half as stored: exactly one of ``full`` or (``a``, ``b``[, ``core``]).

    ``full``: ``(O₂, I₂, *k)`` (or ``(O₂, I₂)`` for linear). Low-rank: ``a (O₂, r)``, ``b (r, I₂·∏k)``.
    Tucker: ``core (r, r, *k)``, ``a (r, O₂)``, ``b (r, I₂)``.
    """

    full: torch.Tensor | None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    core: torch.Tensor | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of a decomposed half."""
        if self.a is None or self.b is None:
            raise ValueError("LoKr: the second half has neither lokr_w2 nor lokr_w2_a/lokr_w2_b")
        return self.a, self.b


def kron_w1(t: Tensors) -> torch.Tensor:
    """The first half ``(O₁, I₁)``: ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``."""
    return t[W1] if W1 in t else t[W1A] @ t[W1B]


def w2_factors(t: Tensors) -> W2Factors:
    """The stored second half (no computation)."""
    if W2 in t:
        return W2Factors(t[W2])
    return W2Factors(None, t[W2A], t[W2B], t.get(T2))


def w2_dims(f: W2Factors, kernel_numel: int) -> tuple[int, int]:
    """``(O₂, I₂)`` read from the second half's shapes (``kernel_numel`` = ∏k unflattens ``lokr_w2_b``)."""
    if f.full is not None:
        i2 = int(f.full.shape[1]) if f.full.ndim > 2 else int(f.full.shape[1]) // kernel_numel
        return int(f.full.shape[0]), i2
    a, b = f.factors()
    if f.core is not None:
        return int(a.shape[1]), int(b.shape[1])
    return int(a.shape[0]), int(b.shape[1]) // kernel_numel


def kron_w2(f: W2Factors, kernel_size: tuple[int, ...]) -> torch.Tensor:
    """The second half rebuilt to ``(O₂, I₂, *k)``."""
    if f.full is not None:
        return f.full.reshape(f.full.shape[0], -1, *kernel_size)
    a, b = f.factors()
    if f.core is not None:
        return rebuild_tucker(f.core, a, b)
    return (a @ b).reshape(a.shape[0], -1, *kernel_size)


def kron_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·kron(w1, w2)``: ``w1 (O₁, I₁)``, ``w2 (O₂, I₂, *k)`` → ``(O₁·O₂, I₁·I₂, *k)``.

    ``ΔW[a·O₂+b, c·I₂+d, …] = scale·w1[a,c]·w2[b,d,…]`` (``torch.kron`` with w1 given trailing unit axes).
    """
    o1, i1 = w1.shape
    o2, i2, *k = w2.shape
    w = torch.einsum("ac,bd...->abcd...", w1 * scale, w2)
    return w.reshape(o1 * o2, i1 * i2, *k)


def _out_positions(spatial: tuple[int, ...], layer: LayerInfo) -> int:
    """Number of output positions of ``layer``'s conv on an input of spatial size ``spatial`` (1 for linear)."""
    if layer.kind == "linear" or isinstance(layer.padding, str):
        return math.prod(spatial)
    n = 1
    for size, k, s, p, d in zip(spatial, layer.kernel_size, layer.stride, layer.padding, layer.dilation):
        n *= max((size + 2 * p - d * (k - 1) - 1) // s + 1, 1)
    return n


def _chain_cost(f: W2Factors, i2: int, o2: int, kernel_numel: int, p_in: int, p_out: int) -> int:
    """Multiply-adds of applying the stored second half to one ``I₂``-channel item."""
    if f.full is not None:
        return i2 * o2 * kernel_numel * p_out
    a, b = f.factors()
    rb = int(b.shape[0])
    if f.core is not None:
        ra = int(a.shape[0])
        return rb * i2 * p_in + ra * rb * kernel_numel * p_out + o2 * ra * p_out
    return rb * i2 * kernel_numel * p_out + o2 * rb * p_out


def w2_goes_first(o1: int, i1: int, o2: int, i2: int, chain: int, p_in: int, p_out: int) -> bool:
    """Whether running the second half first (on ``I₁`` items, then ``w1`` on ``O₂`` channels) costs no more
    multiply-adds than ``w1`` first (on ``I₂`` channels, then the second half on ``O₁`` items).

    ``chain`` is the cost of the second half on one item; ``p_in``/``p_out`` are the spatial positions
    before/after the conv (1 for linear).
    """
    return i1 * chain + o1 * i1 * o2 * p_out <= o1 * i1 * i2 * p_in + o1 * chain


def apply_w2(h: torch.Tensor, f: W2Factors, layer: LayerInfo) -> torch.Tensor:
    """Apply the second half to ``h`` as the base layer would apply a ``(O₂, I₂, *k)`` weight.

    Linear: ``(…, I₂) → (…, O₂)``. Conv: ``(B, I₂, *spatial) → (B, O₂, *spatial')`` with the layer's
    stride/padding/dilation (carried by the op holding the kernel) and groups = 1. Low-rank halves run as
    two ops (``b`` then ``a``), Tucker as three (``b`` pointwise, ``core`` k×k, ``a`` pointwise).
    """
    ones = (1,) * layer.ndim_spatial
    if f.full is not None:
        if layer.kind == "linear":
            return F.linear(h, flat2d(f.full))
        return layer.forward_with(h, f.full.reshape(f.full.shape[0], -1, *layer.kernel_size), groups=1)
    a, b = f.factors()
    r = b.shape[0]
    if layer.kind == "linear":
        return F.linear(F.linear(h, b), a)
    if f.core is not None:
        h = layer.forward_with(h, b.reshape(r, -1, *ones), pointwise=True)
        h = layer.forward_with(h, f.core, groups=1)
        return layer.forward_with(h, a.T.reshape(a.shape[1], -1, *ones), pointwise=True)
    h = layer.forward_with(h, b.reshape(r, -1, *layer.kernel_size), groups=1)
    return layer.forward_with(h, a.reshape(a.shape[0], r, *ones), pointwise=True)


def kron_bypass(x: torch.Tensor, w1: torch.Tensor, f: W2Factors, layer: LayerInfo) -> torch.Tensor:
    """``kron(w1, w2)`` applied to ``x`` through the Kronecker identity, never building ΔW.

    Linear: ``x (…, I₁·I₂)`` is viewed as ``X (…, I₁, I₂)`` and ``Y = w1·X·w2ᵀ (…, O₁, O₂)`` is returned
    flattened to ``(…, O₁·O₂)``. Conv: ``x (N, I₁·I₂, *sp)`` is viewed as ``N·I₁`` items of ``I₂`` channels;
    the second half runs on each item as a conv with the layer's arguments, and ``w1`` contracts the ``I₁``
    axis (einsum), giving ``(N, O₁·O₂, *sp')``. Both halves act on different axes, so they commute; the
    order with fewer multiply-adds is taken (``w1`` first shrinks or grows the batch of the conv to ``O₁``).
    A low-rank second half is rebuilt to ``(O₂, I₂, *k)`` (a small tensor) only when that is cheaper than
    running its factors. Any scale must already be folded into ``w1``. Convs must have ``groups == 1``.
    """
    o1, i1 = w1.shape
    unbatched = layer.kind == "conv" and x.ndim == layer.ndim_spatial + 1
    if unbatched:
        x = x.unsqueeze(0)
    lead, spatial = (x.shape[:-1], ()) if layer.kind == "linear" else (x.shape[:1], tuple(x.shape[2:]))
    i2 = (x.shape[-1] if layer.kind == "linear" else x.shape[1]) // i1
    o2, _ = w2_dims(f, layer.kernel_numel)
    p_in, p_out = math.prod(spatial), _out_positions(spatial, layer)

    chain = _chain_cost(f, i2, o2, layer.kernel_numel, p_in, p_out)
    if f.full is None and chain > i2 * o2 * layer.kernel_numel * p_out:
        f = W2Factors(kron_w2(f, layer.kernel_size))
        chain = _chain_cost(f, i2, o2, layer.kernel_numel, p_in, p_out)
    w2_first = w2_goes_first(o1, i1, o2, i2, chain, p_in, p_out)

    if layer.kind == "linear":
        h = x.reshape(*lead, i1, i2)
        if w2_first:
            out = torch.einsum("ac,...cb->...ab", w1, apply_w2(h, f, layer))
        else:
            out = apply_w2(torch.einsum("ac,...cd->...ad", w1, h), f, layer)
        return out.reshape(*lead, o1 * o2)

    n = x.shape[0]
    if w2_first:
        h = apply_w2(x.reshape(n * i1, i2, *spatial), f, layer)  # (N·I₁, O₂, *sp')
        out = torch.einsum("ac,nc...->na...", w1, h.reshape(n, i1, *h.shape[1:]))
    else:
        h = torch.einsum("ac,nc...->na...", w1, x.reshape(n, i1, i2, *spatial))  # (N, O₁, I₂, *sp)
        out = apply_w2(h.reshape(n * o1, i2, *spatial), f, layer)
    out = out.reshape(n, o1 * o2, *out.shape[-layer.ndim_spatial :])
    return out.squeeze(0) if unbatched else out


# ----------------------------------------------------------------------------------------- algorithm
class LoKr(Algorithm):
    name = "lokr"
    aliases = ("kron",)
    description = "Kronecker product ΔW = kron(w1, w2), halves full or low-rank (Tucker core optional)"
    detector_keys = (W1, W1A)
    tensor_names = (W1, W1A, W1B, W2, W2A, W2B, T2, "alpha", "dora_scale")
    #: the full-w1 variant; a decomposed w1 folds the scalar into ``lokr_w1_a`` (see :meth:`scalar_target_for`)
    scalar_target = W1
    supports_dora = True
    default_bypass = True

    def scalar_target_for(self, t: Tensors) -> str:
        """The tensor a trained scalar is folded into for these tensors: ``lokr_w1`` or ``lokr_w1_a``."""
        return W1A if W1A in t and W1 not in t else W1

    # ----------------------------------------------------------------------------- creation
    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        r, k = opts.dim, layer.kernel_size
        i1, i2 = factorize(layer.in_features, opts.factor)
        o1, o2 = factorize(layer.out_features, opts.factor)
        if opts.unbalanced_factorization:
            o1, o2 = o2, o1
        t: dict[str, torch.Tensor] = {}
        w1_low = opts.decompose_both and r < max(o1, i1) / 2 and not opts.full_matrix
        if w1_low:
            t[W1A], t[W1B] = init.kaiming(o1, r), init.kaiming(r, i1)
        else:
            t[W1] = init.kaiming(o1, i1)
        zero_or_kaiming = init.kaiming if opts.use_scalar else init.zeros
        w2_full = r >= max(o2, i2) / 2 or opts.full_matrix
        if w2_full:
            t[W2] = zero_or_kaiming(o2, i2, *k)
        elif opts.use_tucker and layer.kind == "conv" and not layer.is_pointwise:
            t[T2] = init.kaiming(r, r, *k)
            t[W2A], t[W2B] = init.kaiming(r, o2), zero_or_kaiming(r, i2)
        else:
            t[W2A], t[W2B] = init.kaiming(o2, r), zero_or_kaiming(r, i2 * layer.kernel_numel)
        if w2_full and not w1_low:
            t["alpha"] = alpha_tensor(r)  # scale 1; LyCORIS writes dim here
        else:
            alpha = opts.effective_alpha()
            t["alpha"] = alpha_tensor(alpha * r / math.sqrt(r) if opts.rs_lora else alpha)
        return t

    # ----------------------------------------------------------------------------- math
    def rank(self, t: Tensors) -> int | None:
        for key in (W2B, W1B):
            if key in t:
                return int(t[key].shape[0])
        return None

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        w2 = kron_w2(w2_factors(t), layer.kernel_size)
        return kron_delta(kron_w1(t), w2, self.scale(t))

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
        """``f(x) + μ·s·kron(w1, w2)·x`` through :func:`kron_bypass`.

        LoKr has no per-rank hidden activation, so ``hidden_hook`` (rank dropout) masks the output channels of
        the adapter's part, which equals masking ΔW's output rows as rebuild mode does. Grouped convs fall
        back to building ΔW.
        """
        if layer.groups != 1:
            return super().bypass(x, base_out, t, layer, multiplier, base_weight=base_weight, base_bias=base_bias,
                                  hidden_hook=hidden_hook)
        dtype = x.dtype
        w1 = kron_w1(t).to(dtype) * (multiplier * self.scale(t))
        f = W2Factors(*(None if v is None else v.to(dtype) for v in w2_factors(t)))
        c = kron_bypass(x, w1, f, layer)
        return base_out + (c if hidden_hook is None else hidden_hook(c))

    # ----------------------------------------------------------------------------- file facts
    def describe(self, t: Tensors) -> dict[str, object]:
        out = super().describe(t)
        out["w1"] = "low-rank" if W1 not in t and W1A in t else "full"
        out["w2"] = "full" if W2 in t else ("tucker" if T2 in t else "low-rank")
        return out

    def implied_weight_shape(self, t: Tensors) -> tuple[int, ...] | None:
        try:
            o1, i1 = (t[W1].shape if W1 in t else (t[W1A].shape[0], t[W1B].shape[1]))[:2]
            if W2 in t:
                o2, i2, kernel = t[W2].shape[0], t[W2].shape[1], tuple(t[W2].shape[2:])
            elif T2 in t:
                o2, i2, kernel = t[W2A].shape[1], t[W2B].shape[1], tuple(t[T2].shape[2:])
            else:
                o2, i2, kernel = t[W2A].shape[0], t[W2B].shape[1], ()
        except (KeyError, IndexError):
            return None
        return (int(o1) * int(o2), int(i1) * int(i2), *map(int, kernel))

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        """Check presence and partner shapes of both halves, then ``O₁·O₂ = O``, ``I₁·I₂ = I`` and the kernel.

        Works from shapes only (ΔW is not built).
        """
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")

        def need(*names: str) -> None:
            for n in names:
                if n not in t:
                    raise CorruptFileError(f"{key}: LoKr module lacks {key}.{n}")

        def dims(n: str, nd: int) -> tuple[int, ...]:
            if t[n].ndim != nd:
                raise CorruptFileError(f"{key}.{n}: expected {nd} dimensions, got shape {tuple(t[n].shape)}")
            return tuple(int(s) for s in t[n].shape)

        if W1 in t:
            o1, i1 = dims(W1, 2)
        else:
            need(W1A, W1B)
            (o1, r1), (r1b, i1) = dims(W1A, 2), dims(W1B, 2)
            if r1 != r1b:
                raise CorruptFileError(f"{key}: {W1A} {(o1, r1)} and {W1B} {(r1b, i1)} disagree on the rank")
        kn, ks = layer.kernel_numel, layer.kernel_size
        if W2 in t:
            w2 = tuple(int(s) for s in t[W2].shape)
            if len(w2) < 2:
                raise CorruptFileError(f"{key}.{W2}: expected at least 2 dimensions, got shape {w2}")
            o2, i2 = w2[0], w2[1]
            if layer.kind == "conv" and len(w2) == 2:  # a flattened conv half is read too
                i2, rest = divmod(w2[1], kn)
                fits = rest == 0
            else:
                fits = w2[2:] == ks or (layer.kind == "linear" and all(s == 1 for s in w2[2:]))
            if not fits:
                raise IncompatibleBaseError(f"{key}.{W2}: shape {w2} does not fit a layer with kernel {ks}")
        elif T2 in t:
            need(W2A, W2B)
            if layer.kind != "conv":
                raise IncompatibleBaseError(f"{key}.{T2}: a Tucker core needs a conv layer, not {layer.kind}")
            core = tuple(int(s) for s in t[T2].shape)
            (ra, o2), (rb, i2) = dims(W2A, 2), dims(W2B, 2)
            if core[:2] != (ra, rb):
                raise CorruptFileError(f"{key}: {T2} {core} does not fit {W2A} {(ra, o2)} / {W2B} {(rb, i2)}")
            if core[2:] != tuple(ks):
                raise IncompatibleBaseError(f"{key}.{T2}: kernel {core[2:]} but the layer's kernel is {ks}")
        else:
            need(W2A, W2B)
            (o2, r2), (r2b, flat) = dims(W2A, 2), dims(W2B, 2)
            if r2 != r2b:
                raise CorruptFileError(f"{key}: {W2A} {(o2, r2)} and {W2B} {(r2b, flat)} disagree on the rank")
            i2, rest = divmod(flat, kn)
            if rest:
                raise IncompatibleBaseError(f"{key}.{W2B}: {flat} columns is not a multiple of kernel size {kn}")
        if o1 * o2 != layer.out_features or i1 * i2 != layer.in_features:
            raise IncompatibleBaseError(
                f"{key}: LoKr halves ({o1}×{i1}) ⊗ ({o2}×{i2}) give a {o1 * o2}×{i1 * i2} weight, the layer's "
                f"weight is {layer.weight_shape}"
            )
        if "dora_scale" in t and t["dora_scale"].numel() not in (layer.out_features, layer.in_features):
            raise IncompatibleBaseError(
                f"{key}.dora_scale: shape {tuple(t['dora_scale'].shape)} fits neither {layer.out_features} outputs "
                f"nor {layer.in_features} inputs"
            )
