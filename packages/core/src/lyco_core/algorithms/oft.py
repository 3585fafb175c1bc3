"""Diag-OFT: a block-diagonal orthogonal rotation of the output channels (Cayley-parametrised).

Tensors (LyCORIS names, shared with BOFT):

* ``oft_blocks (n, b, b)`` with ``(b, n) = factorize(O, dim)`` (the smaller factor is the block size).
* ``alpha ()``: the **constraint** c, not a LoRA alpha; 0 means none. The bound used is ``c·O``.
* ``rescale (O, 1…)`` (optional): a per-output-channel scale applied after the rotation.

Math. ``Q = B − Bᵀ`` per block; if ``c > 0`` and ``‖Q‖_F + 1e-8 > c·O`` (norm over all blocks jointly,
the 1e-8 is LyCORIS's) then ``Q ← Q·c·O/(‖Q‖_F + 1e-8)``. ``R = (I + Q)(I − Q)⁻¹`` (Cayley) in float32 (float64
when the blocks are float64). Output rows are cut into n consecutive groups of b and ``W'_k = R_kᵀ·W_k``;
then ``W'' = rescale ⊙ W'``. The bias is left alone.

Multiplier μ. ``R ← μR + (1−μ)I`` (as LyCORIS) and, in Lyco, ``rescale ← μ·rescale + (1−μ)`` so that μ=0
gives W exactly. LyCORIS applies the full rescale at every μ; at μ=1 both agree.

Bypass rotates the layer's output activations instead of the weight:
``y = rescale ⊙ rotate(base_out − b) + b``, which equals ``layer.forward(x, *merge(W, b))`` exactly (LyCORIS's
bypass rotates the bias too; Lyco does not). It never builds W' and composes with adapters stacked before it,
since it only needs their output.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch

from ..errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from ..layers import LayerInfo
from .base import AdapterOptions, Algorithm, HiddenHook, Tensors, alpha_tensor
from .factorization import factorize

BLOCKS, RESCALE, ALPHA = "oft_blocks", "rescale", "alpha"
#: LyCORIS adds this to ‖Q‖_F before comparing it with the bound and dividing by it
NORM_EPS = 1e-8


# --------------------------------------------------------------------------------------------- pure math
def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (the Cayley transform never runs in half precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cayley(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """Orthogonal blocks ``R = (I + Q)(I − Q)⁻¹`` from raw blocks ``(..., b, b)``; same shape.

    ``Q = B − Bᵀ``; with ``bound > 0``, Q is scaled by ``min(1, bound/(‖Q‖_F + 1e-8))``, the Frobenius norm
    taken over *all* blocks at once. Computed in :func:`compute_dtype` of ``blocks``; differentiable.
    """
    b = blocks.to(compute_dtype(blocks))
    q = b - b.transpose(-1, -2)
    if bound > 0:
        q = q * torch.clamp(bound / (torch.linalg.vector_norm(q) + NORM_EPS), max=1.0)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    # (I − Q)⁻¹(I + Q) = (I + Q)(I − Q)⁻¹: both factors are functions of Q, so they commute
    return torch.linalg.solve(eye - q, eye + q)


def interpolate(r: torch.Tensor, multiplier: float) -> torch.Tensor:
    """``μR + (1−μ)I`` for blocks ``(..., b, b)``; ``r`` itself at μ=1."""
    if multiplier == 1.0:
        return r
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    return multiplier * r + (1.0 - multiplier) * eye


def rescale_at(rescale: torch.Tensor, multiplier: float) -> torch.Tensor:
    """The per-channel scale at μ as a vector ``(O,)``: ``μ·rescale + (1−μ)`` (1 at μ=0)."""
    s = rescale.reshape(-1)
    return s if multiplier == 1.0 else multiplier * s + (1.0 - multiplier)


def rotate_blocks(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Block-diagonal map on the **last** axis: ``v'[..., kb+i] = Σ_j r[k, i, j]·v[..., kb+j]``.

    ``v``: ``(..., n·b)``; ``r``: ``(n, b, b)``. Diag-OFT passes ``Rᵀ`` (``r.mT``).
    """
    n, b, _ = r.shape
    h = v.reshape(*v.shape[:-1], n, b)
    return torch.einsum("...kj,kij->...ki", h, r).reshape(v.shape)


def diag_oft_transform(v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, axis: int) -> torch.Tensor:
    """Apply Diag-OFT (rotation ``Rᵀ`` per block, then ``scale``) along ``axis`` of ``v``.

    ``v``: any tensor whose ``axis`` has size O = n·b (a weight ``(O, I, *k)`` with axis 0, or an activation
    with its channel axis); ``r``: ``(n, b, b)`` already interpolated; ``scale``: ``(O,)`` or None.
    Returns ``v``'s shape in ``r``'s dtype.
    """
    h = v.to(r.dtype).movedim(axis, -1)
    h = rotate_blocks(h, r.transpose(-1, -2))
    if scale is not None:
        h = h * scale.to(h.dtype)
    return h.movedim(-1, axis)


# --------------------------------------------------------------------------------------------- shared algorithm
class OrthogonalAlgorithm(Algorithm):
    """What Diag-OFT and BOFT share: a rotation of the output channel axis, optional rescale, constraint.

    Subclasses give the block layout (:meth:`block_shape`, :meth:`check_blocks`) and the rotation itself
    (:meth:`transform`). Not registered itself.
    """

    layer_kinds = frozenset({"linear", "conv"})
    tensor_names = (BLOCKS, RESCALE, ALPHA)
    frozen_names = frozenset({ALPHA})
    detector_keys = (BLOCKS,)
    needs_base_weight = True
    additive = False
    default_bypass = False  # LyCORIS's default is the rebuilt weight; both are cheap
    #: ndim of ``oft_blocks`` that identifies the subclass in a file
    blocks_ndim: ClassVar[int]

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def block_shape(self, layer: LayerInfo, opts: AdapterOptions) -> tuple[int, ...]:
        """Shape of ``oft_blocks`` for a new module (raises InvalidConfigError when there is none)."""

    @abstractmethod
    def check_blocks(self, blocks: torch.Tensor, layer: LayerInfo, key: str) -> None:
        """Raise CorruptFileError/IncompatibleBaseError naming ``key`` when ``blocks`` do not fit ``layer``."""

    @abstractmethod
    def transform(self, v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, axis: int) -> torch.Tensor:
        """Rotate (then scale) ``v`` along ``axis``; ``r`` are the interpolated orthogonal blocks."""

    def output_rotation_is_exact(self, t: Tensors, layer: LayerInfo) -> bool:
        """Whether rotating a grouped conv's outputs equals rotating its weight rows (see :meth:`bypass`)."""
        return layer.kind != "conv" or layer.groups == 1

    # ------------------------------------------------------------------ detection / creation
    def matches(self, t: Tensors) -> bool:
        return BLOCKS in t and t[BLOCKS].ndim == self.blocks_ndim

    def check_options(self, opts: AdapterOptions, layer: LayerInfo) -> None:
        super().check_options(opts, layer)
        if layer.kind not in self.layer_kinds:
            raise InvalidConfigError(f"algo: {self.name} cannot be applied to a {layer.kind} layer")
        self.block_shape(layer, opts)

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        t = {BLOCKS: torch.zeros(self.block_shape(layer, opts))}  # R = I
        if opts.rescaled:
            t[RESCALE] = torch.ones(layer.out_features, *([1] * (len(layer.weight_shape) - 1)))
        t[ALPHA] = alpha_tensor(opts.constraint)
        return t

    # ------------------------------------------------------------------ math
    def constraint(self, t: Tensors) -> float:
        """The stored constraint c (0 when absent)."""
        return float(t[ALPHA].float().item()) if ALPHA in t else 0.0

    def rotations(
        self, t: Tensors, layer: LayerInfo, multiplier: float, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Orthogonal blocks at μ (same shape as ``oft_blocks``), the bound being ``c·O``.

        Computed in float64 when ``dtype`` or the blocks are float64, else float32.
        """
        blocks = t[BLOCKS]
        blocks = blocks.to(torch.promote_types(compute_dtype(blocks), dtype))
        return interpolate(cayley(blocks, self.constraint(t) * layer.out_features), multiplier)

    def _apply(self, v: torch.Tensor, t: Tensors, layer: LayerInfo, multiplier: float, axis: int) -> torch.Tensor:
        """Rotate and rescale ``v`` along ``axis`` at μ, in float64 if ``v`` or the blocks are, else float32."""
        r = self.rotations(t, layer, multiplier, compute_dtype(v))
        scale = rescale_at(t[RESCALE].to(r.dtype), multiplier) if RESCALE in t else None
        return self.transform(v, r, scale, axis)

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
        """``(rescale_μ ⊙ rotate_μ(W), b)`` in ``weight``'s dtype; μ=0 returns ``(W, b)`` themselves.

        ``row_mask`` is unused: rank dropout does not apply to this multiplicative algorithm.
        """
        if multiplier == 0.0:
            return weight, bias
        return self._apply(weight, t, layer, multiplier, axis=0).to(weight.dtype), bias

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``W' − W`` at μ=1, in the compute dtype (float64 when the weight or blocks are, else float32)."""
        if base_weight is None:
            raise ValueError(f"{self.name} needs the base weight to compute its weight change")
        new_w = self._apply(base_weight, t, layer, 1.0, axis=0)
        return new_w - base_weight.to(new_w.dtype)

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
        """``rescale_μ ⊙ rotate_μ(base_out − b) + b`` on the channel axis, without building W'.

        ``base_out`` is the output of the layer (and of adapters stacked before this one); ``base_bias`` is the
        bias that :meth:`merge` would see (None: nothing to exclude). Cost: O(tokens·O·b) per rotation stage.
        For a grouped conv whose blocks mix channels of different groups, rotating outputs is not the same as
        rotating weight rows; there it runs the layer with the merged weight (needs ``base_weight``).
        """
        if multiplier == 0.0:
            return base_out
        if not self.output_rotation_is_exact(t, layer):
            if base_weight is None:
                raise ValueError(f"{self.name} on a grouped conv needs the base weight")
            return layer.forward(x, *self.merge(base_weight, base_bias, t, layer, multiplier)).to(base_out.dtype)
        if layer.kind == "linear":
            axis = -1
        else:  # (N, C, *spatial), or (C, *spatial) for an unbatched conv input
            axis = 1 if base_out.ndim == layer.ndim_spatial + 2 else 0
        y = base_out.to(compute_dtype(base_out))
        if base_bias is not None:
            y = y - layer.channel_view(base_bias.to(y.dtype))
        y = self._apply(y, t, layer, multiplier, axis)
        if base_bias is not None:
            y = y + layer.channel_view(base_bias.to(y.dtype))
        return y.to(base_out.dtype)

    # ------------------------------------------------------------------ file facts
    def describe(self, t: Tensors) -> dict[str, object]:
        blocks = t[BLOCKS]
        return {
            "algo": self.name,
            "block_size": int(blocks.shape[-1]),
            "block_num": int(blocks.shape[-3]),
            **({"stages": int(blocks.shape[0])} if blocks.ndim == 4 else {}),
            "constraint": self.constraint(t),
            "rescaled": RESCALE in t,
        }

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        if BLOCKS not in t:
            raise CorruptFileError(f"{key}: {self.name} module has no {BLOCKS}")
        blocks = t[BLOCKS]
        if blocks.ndim != self.blocks_ndim or blocks.shape[-1] != blocks.shape[-2] or blocks.shape[-1] < 1:
            raise CorruptFileError(
                f"{key}.{BLOCKS}: shape {tuple(blocks.shape)} is not a stack of square blocks "
                f"with {self.blocks_ndim} dimensions ({self.name})"
            )
        self.check_blocks(blocks, layer, key)
        if RESCALE in t:
            s = t[RESCALE]
            if s.numel() != layer.out_features or (s.ndim > 0 and s.shape[0] != layer.out_features):
                raise IncompatibleBaseError(
                    f"{key}.{RESCALE}: shape {tuple(s.shape)} does not fit {layer.out_features} output channels"
                )
        if ALPHA in t:
            a = t[ALPHA]
            if a.numel() != 1 or not torch.isfinite(a.float()).all():
                raise CorruptFileError(f"{key}.{ALPHA}: the constraint must be one finite number")


# --------------------------------------------------------------------------------------------- Diag-OFT
class DiagOFT(OrthogonalAlgorithm):
    name = "diag-oft"
    aliases = ("oft",)
    description = "orthogonal fine-tuning: block-diagonal Cayley rotation of the output channels"
    blocks_ndim = 3

    def block_shape(self, layer: LayerInfo, opts: AdapterOptions) -> tuple[int, ...]:
        b, n = factorize(layer.out_features, opts.dim)
        return (n, b, b)

    def check_blocks(self, blocks: torch.Tensor, layer: LayerInfo, key: str) -> None:
        n, b, _ = blocks.shape
        if n * b != layer.out_features:
            raise IncompatibleBaseError(
                f"{key}.{BLOCKS}: {n} blocks of size {b} do not cover the layer's {layer.out_features} output channels"
            )

    def transform(self, v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, axis: int) -> torch.Tensor:
        return diag_oft_transform(v, r, scale, axis)

    def output_rotation_is_exact(self, t: Tensors, layer: LayerInfo) -> bool:
        # a block that stays inside one conv group maps that group's outputs only
        if layer.kind != "conv" or layer.groups == 1:
            return True
        return (layer.out_features // layer.groups) % int(t[BLOCKS].shape[-1]) == 0
