"""Tucker (CP-style) core rebuilds shared by LoRA, LoHa and LoKr conv modules."""

from __future__ import annotations

import torch


def rebuild_tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``W[o,c,*k] = Σ_{p,q} core[p,q,*k] · a[p,o] · b[q,c]``.

    ``core``: ``(r1, r2, *k)``; ``a``: ``(r1, O)``; ``b``: ``(r2, I)`` → ``(O, I, *k)``.
    """
    k = core.shape[2:]
    w = a.T @ core.reshape(core.shape[0], -1)  # (O, r2·∏k)
    w = w.reshape(a.shape[1], core.shape[1], -1)  # (O, r2, ∏k)
    w = torch.einsum("oqk,qc->ock", w, b)
    return w.reshape(a.shape[1], b.shape[1], *k)
