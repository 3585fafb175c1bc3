"""BOFT: butterfly orthogonal fine-tuning, a product of m block-diagonal rotations of the output channels.

Tensors (LyCORIS names): ``oft_blocks (m, n, b, b)``, ``alpha ()`` (the constraint c, as in Diag-OFT) and an
optional ``rescale (O, 1…)``. ``(b, n) = power2_factorize(O, dim)``: b is the largest even divisor of O with
``b ≤ dim`` such that ``n = O/b`` is a power of two; ``m = log₂n + 1``.

Math. All ``m·n`` blocks go through the Diag-OFT Cayley transform, the constraint ``c·O`` bounding ‖Q‖_F over
all stages and blocks jointly. Stage ``i = 0..m−1`` with ``k = 2^i·b/2``: view the output axis as ``(c, 2, k)``,
reorder it to ``(c, k, 2)``, cut it into consecutive groups of b, apply ``y = R_{i,j}·x`` (plain R, not Rᵀ) to
group j and undo the reorder. After the last stage multiply by ``rescale``. The bias is left alone.

Multiplier μ: every stage is interpolated, ``R_i ← μR_i + (1−μ)I`` (as LyCORIS), and ``rescale ← μ·rescale +
(1−μ)`` (Lyco; LyCORIS applies the full rescale at every μ), so μ=0 gives W exactly.

Merge and bypass are those of :class:`~lyco_core.algorithms.oft.OrthogonalAlgorithm`: bypass runs the
butterfly on the output activations minus the bias, never building W'.
"""

from __future__ import annotations

import torch

from ..errors import CorruptFileError, IncompatibleBaseError
from ..layers import LayerInfo
from .base import AdapterOptions
from .factorization import power2_factorize
from .oft import BLOCKS, OrthogonalAlgorithm

__all__ = ["BOFT", "boft_stages", "butterfly", "butterfly_transform"]


def boft_stages(block_num: int) -> int:
    """``m = log₂n + 1`` stages for ``n`` (a power of two) blocks."""
    return block_num.bit_length()


def butterfly(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Run the butterfly stages on the **last** axis of ``v`` ``(..., O)``; ``r``: ``(m, n, b, b)``, ``n·b = O``.

    Stage i (k = 2^i·b/2): ``(c, 2, k) → (c, k, 2)``, groups of b, ``x ← R_{i,j}·x``, reorder back.
    """
    m, n, b, _ = r.shape
    lead, size = v.shape[:-1], v.shape[-1]
    for i in range(m):
        k = (1 << i) * (b // 2)
        h = v.reshape(*lead, size // (2 * k), 2, k).transpose(-1, -2).reshape(*lead, n, b)
        h = torch.einsum("...kj,kij->...ki", h, r[i])
        v = h.reshape(*lead, size // (2 * k), k, 2).transpose(-1, -2).reshape(*lead, size)
    return v


def butterfly_transform(v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, axis: int) -> torch.Tensor:
    """Apply BOFT (all stages, then ``scale`` ``(O,)`` if given) along ``axis`` of ``v``; result in ``r``'s dtype.

    ``v`` is a weight ``(O, I, *k)`` with axis 0 or an activation with its channel axis.
    """
    h = butterfly(v.to(r.dtype).movedim(axis, -1), r)
    if scale is not None:
        h = h * scale.to(h.dtype)
    return h.movedim(-1, axis)


class BOFT(OrthogonalAlgorithm):
    name = "boft"
    description = "butterfly orthogonal fine-tuning: log₂n+1 stages of block rotations of the output channels"
    blocks_ndim = 4

    def block_shape(self, layer: LayerInfo, opts: AdapterOptions) -> tuple[int, ...]:
        b, n = power2_factorize(layer.out_features, opts.dim)  # InvalidConfigError when impossible
        return (boft_stages(n), n, b, b)

    def check_blocks(self, blocks: torch.Tensor, layer: LayerInfo, key: str) -> None:
        m, n, b, _ = blocks.shape
        if n * b != layer.out_features:
            raise IncompatibleBaseError(
                f"{key}.{BLOCKS}: {n} blocks of size {b} do not cover the layer's {layer.out_features} output channels"
            )
        if b % 2 or n & (n - 1):
            raise CorruptFileError(
                f"{key}.{BLOCKS}: BOFT needs an even block size and a power-of-two block count, got b={b}, n={n}"
            )
        if not 1 <= m <= boft_stages(n):
            raise CorruptFileError(f"{key}.{BLOCKS}: {m} butterfly stages, at most {boft_stages(n)} fit {n} blocks")

    def transform(self, v: torch.Tensor, r: torch.Tensor, scale: torch.Tensor | None, axis: int) -> torch.Tensor:
        return butterfly_transform(v, r, scale, axis)
