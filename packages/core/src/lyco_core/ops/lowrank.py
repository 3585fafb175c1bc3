"""Low-rank approximation of a weight change: rank rules and SVD to LoRA/LoCon factors.

Shared by ``extract``, ``resize``, ``merge --rank`` and ``convert --algo lora``.

* :func:`select_rank` picks a rank from singular values by one of the rules LyCORIS' ``extract_locon`` and
  sd-scripts' ``resize_lora`` offer (semantics documented there; ours are stated exactly, without tools' quirks).
* :func:`to_lora` turns ΔW ``(O, I)`` or a conv ΔW ``(O, I, *k)`` into kohya ``lora_up``/``lora_down``
  (and ``lora_mid`` for a Tucker conv), with α = r so the scale is 1, and reports the relative Frobenius error.
* :func:`factored_to_lora` does the same for ΔW = up·down given as factors (a LoRA, or several concatenated)
  without building ΔW: QR of both factors and the SVD of the small core.
* :func:`lowrank_svd` is the SVD behind it: full LAPACK SVD or a seeded randomized SVD (Halko, Martinsson and
  Tropp 2011, the algorithm of ``torch.svd_lowrank``, with oversampling and power iterations).

Everything is computed in float32 on the input's device (norms for the errors are accumulated in float64).

When ``method="auto"`` picks the randomized SVD (measured on the shared 2-core CPU this was developed on, torch 2.13
with MKL, float32, 16 extra samples, 4 power iterations, trained-like σᵢ ∝ (1+i)^-0.7 spectra; times include
building the factors and the error, and vary up to ~2× between runs on that machine):

=============  ====  ===========  ===========  =========================================
matrix         rank  full SVD     randomized   randomized error / Eckart–Young optimum
=============  ====  ===========  ===========  =========================================
1280×1280      32    230 ms       17 ms        1.0000 (r=64: 1.0006)
320×2880       32    70 ms        16 ms        1.0001 (r=64: 1.0007)
320×320        32    8 ms         3 ms         1.0001
128×1152       16    65 ms        19 ms        1.0001
128×128        16    1.1 ms       1.4 ms       1.0001
192×192        64    27 ms        43 ms        1.0007
=============  ====  ===========  ===========  =========================================

The randomized SVD loses when the sketch (r + 16 columns) is a large part of the smaller dimension or the matrix
is tiny, so ``auto`` uses it for a fixed rank r when ``4·(r + 16) ≤ min(O, I·∏k)`` and ``O·I·∏k ≥ 32768``, and the
full SVD otherwise. Dynamic rank rules need the whole spectrum, so they always use the full SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..algorithms.base import alpha_tensor
from ..algorithms.lora import lora_delta
from ..errors import InvalidConfigError

#: rank-selection rules accepted by :func:`select_rank` (and ``--mode``/``--dynamic`` options)
MODES = ("fixed", "threshold", "ratio", "quantile", "sv_ratio", "sv_fro", "sv_cumulative")
METHODS = ("auto", "full", "randomized")

#: randomized SVD: extra sampled directions and power iterations (accuracy within ~0.2 % of optimal)
OVERSAMPLE = 16
POWER_ITERS = 4
#: ``auto`` uses the randomized SVD only from this many entries on, for (r + OVERSAMPLE)·RATIO ≤ min-dim
AUTO_MIN_ENTRIES = 32768
AUTO_RANK_RATIO = 4
#: partial-sum fractions this close below a rule's parameter count as reaching it (float32 rounding of σ)
_F32_TOL = 4 * float(torch.finfo(torch.float32).eps)
#: HOOI refinement sweeps after the truncated HOSVD of a Tucker conv
TUCKER_SWEEPS = 2


def select_rank(s: torch.Tensor, mode: str, param: float | None, max_rank: int | None = None) -> int:
    """The rank to keep for singular values ``s`` (1-D, descending, ≥ 0) under rule ``mode``.

    Rules (r counts kept singular values; Σ sums over all of ``s``):

    * ``fixed``: r = ``param`` (an integer ≥ 1).
    * ``threshold``: r = #{σ > param} (param ≥ 0, in ΔW's units).
    * ``ratio``: r = #{σ > param·σ_max} (0 ≤ param ≤ 1).
    * ``quantile`` and ``sv_cumulative``: the smallest r with Σ_{i≤r} σ_i / Σ σ ≥ param (0 < param ≤ 1).
    * ``sv_ratio``: r = #{σ : σ_max/σ ≤ param}, i.e. σ ≥ σ_max/param (param ≥ 1).
    * ``sv_fro``: the smallest r with √(Σ_{i≤r} σ_i² / Σ σ²) ≥ param (0 < param ≤ 1), i.e. the kept part
      holds at least that fraction of ΔW's Frobenius norm.

    The result is clamped to [1, min(max_rank, len(s))]. These are the minimal ranks that satisfy each
    rule: sd-scripts' ``resize_lora`` keeps one component more than the minimum for ``sv_*`` (an
    off-by-one in its index arithmetic) and LyCORIS' ``quantile`` keeps one fewer (it counts the partial sums
    strictly below the quantile); we copy neither quirk. An all-zero ``s`` gives 1.

    Raises :class:`InvalidConfigError` naming the mode or parameter when either is invalid.
    """
    if mode not in MODES:
        raise InvalidConfigError(f"rank mode {mode!r} is not one of {', '.join(MODES)}")
    if max_rank is not None and max_rank < 1:
        raise InvalidConfigError(f"max_rank: must be ≥ 1, got {max_rank}")
    n = int(s.numel())
    cap = n if max_rank is None else min(int(max_rank), n)
    if param is None:
        raise InvalidConfigError(f"rank mode {mode!r} needs a parameter (--param)")
    p = float(param)
    if not math.isfinite(p):
        raise InvalidConfigError(f"rank mode {mode!r}: parameter must be finite, got {param}")
    if mode == "fixed":
        if p < 1 or p != int(p):
            raise InvalidConfigError(f"rank: must be an integer ≥ 1, got {param}")
        return max(1, min(int(p), cap))
    if mode == "threshold" and p < 0:
        raise InvalidConfigError(f"rank mode 'threshold': parameter must be ≥ 0, got {param}")
    if mode == "ratio" and not 0 <= p <= 1:
        raise InvalidConfigError(f"rank mode 'ratio': parameter must be in [0, 1], got {param}")
    if mode == "sv_ratio" and p < 1:
        raise InvalidConfigError(f"rank mode 'sv_ratio': parameter must be ≥ 1, got {param}")
    if mode in ("quantile", "sv_cumulative", "sv_fro") and not 0 < p <= 1:
        raise InvalidConfigError(f"rank mode {mode!r}: parameter must be in (0, 1], got {param}")

    sv = s.detach().double().cpu().flatten()
    if n == 0 or float(sv[0]) <= 0:
        return 1
    smax = float(sv[0])
    if mode == "threshold":
        r = int((sv > p).sum())
    elif mode == "ratio":
        r = int((sv > p * smax).sum())
    elif mode == "sv_ratio":
        r = int((sv * p >= smax).sum())
    else:
        vals = sv * sv if mode == "sv_fro" else sv
        frac = torch.cumsum(vals, 0) / vals.sum()
        if mode == "sv_fro":
            frac = frac.sqrt()
        # σ come from a float32 SVD: a fraction within float32 rounding of p counts as reaching it
        hit = torch.nonzero(frac >= p - _F32_TOL)
        r = int(hit[0]) + 1 if hit.numel() else n
    return max(1, min(r, cap))


@dataclass
class LowRank:
    """A LoRA approximation of one ΔW, in kohya layout, at scale 1 (α = rank).

    * ``up``: ``(O, r)`` for a linear ΔW, ``(O, r, 1…)`` for a conv.
    * ``down``: ``(r, I)``, ``(r, I, *k)`` for a conv, or ``(r, I, 1…)`` with a Tucker core.
    * ``mid``: the Tucker core ``(r, r, *k)`` or None.
    * ``rel_error``: ‖ΔW_lora − ΔW‖_F / ‖ΔW‖_F (0 when ΔW is 0).
    * ``shape``: ΔW's shape; ``method``: the SVD actually used (``full`` or ``randomized``).
    """

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None
    rank: int
    rel_error: float
    shape: tuple[int, ...]
    method: str = "full"

    def tensors(self) -> dict[str, torch.Tensor]:
        """kohya/LyCORIS tensors of the module: ``lora_up.weight``, ``lora_down.weight``, [``lora_mid.weight``],
        ``alpha`` (= rank, so ΔW = up·[mid·]down)."""
        out = {"lora_up.weight": self.up.contiguous(), "lora_down.weight": self.down.contiguous()}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid.contiguous()
        out["alpha"] = alpha_tensor(self.rank)
        return out

    def delta(self) -> torch.Tensor:
        """The ΔW these factors give, shape ``self.shape``, float32."""
        mid = None if self.mid is None else self.mid.float()
        return lora_delta(self.down.float(), self.up.float(), mid, 1.0, self.shape)


def lowrank_svd(
    a: torch.Tensor, rank: int, method: str = "full", *, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``rank`` singular triplets of the 2-D float32 matrix ``a`` ``(m, n)``.

    Returns ``U (m, q)``, ``S (q,)`` descending, ``Vh (q, n)``, where ``q = min(m, n)`` for ``method="full"``
    (the whole spectrum, so callers can apply rank rules) and ``q = rank`` for ``"randomized"`` (a seeded
    Gaussian sketch with :data:`OVERSAMPLE` extra columns and :data:`POWER_ITERS` power iterations,
    re-orthonormalised each time; deterministic for a given ``seed``).
    """
    if method == "full":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u, s, vh
    if method != "randomized":
        raise InvalidConfigError(f"SVD method {method!r} is not one of full, randomized")
    m, n = a.shape
    if m < n:  # sketch the smaller side: work on aᵀ and swap the factors back
        u, s, vh = lowrank_svd(a.T, rank, method, seed=seed)
        return vh.T, s, u.T
    q = min(rank + OVERSAMPLE, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=g, dtype=a.dtype).to(a.device)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.T @ basis).Q).Q
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ ub)[:, :rank], s[:rank], vh[:rank]


def choose_method(shape2d: tuple[int, int], rank: int | None, mode: str, method: str) -> str:
    """``full`` or ``randomized`` for an SVD of a ``shape2d`` matrix (see the module docstring for ``auto``)."""
    if method not in METHODS:
        raise InvalidConfigError(f"SVD method {method!r} is not one of {', '.join(METHODS)}")
    small = min(shape2d)
    if method == "randomized":
        return "randomized" if mode == "fixed" and rank is not None and rank < small else "full"
    if method == "full" or mode != "fixed" or rank is None:
        return "full"
    fast = shape2d[0] * shape2d[1] >= AUTO_MIN_ENTRIES and (rank + OVERSAMPLE) * AUTO_RANK_RATIO <= small
    return "randomized" if fast else "full"


def _norm(x: torch.Tensor) -> float:
    """Frobenius norm accumulated in float64 (a float32 sum over ~10⁷ entries is off by ~10⁻³)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _rel(err: float, norm: float) -> float:
    return 0.0 if norm == 0 else err / norm


def to_lora(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    mode: str = "fixed",
    param: float | None = None,
    max_rank: int | None = None,
    tucker: bool = False,
    method: str = "auto",
) -> LowRank:
    """The best rank-r LoRA (Eckart–Young) of ``delta``, or a Tucker LoCon for a k×k conv.

    ``delta``: ΔW ``(O, I)``, or a conv ΔW ``(O, I, *k)`` (1-, 2- or 3-d); a conv is flattened to
    ``(O, I·∏k)`` for the SVD. Rank: ``mode="fixed"`` uses ``rank`` (or ``param``); any other rule of
    :func:`select_rank` uses ``param``, with ``rank`` (when given) and ``max_rank`` as caps. Factors:
    ``up = U·diag(σ)``, ``down = Vᵀ`` (kohya's convention), α = r.

    ``tucker=True`` on a conv with some k > 1 gives LyCORIS' Tucker LoCon: ``down (r, I, 1…)``,
    ``mid (r, r, *k)``, ``up (O, r, 1…)`` with ΔW[o,c,·] ≈ Σ up[o,i]·mid[i,j,·]·down[j,c], from a truncated
    HOSVD refined by :data:`TUCKER_SWEEPS` HOOI sweeps (not optimal in general; the error is measured).
    The rank is selected on the flattened ΔW's spectrum and capped at min(O, I).

    ``method``: ``full`` (LAPACK SVD), ``randomized`` (:func:`lowrank_svd`) or ``auto`` (see module docstring).
    ``rel_error`` is exact: from the discarded singular values for the full SVD, from the residual otherwise.
    """
    if delta.ndim < 2:
        raise InvalidConfigError(f"to_lora: ΔW must be 2-D or a conv weight, got shape {tuple(delta.shape)}")
    if mode == "fixed":
        param = rank if rank is not None else param
        cap = max_rank
    else:
        cap = rank if max_rank is None else (max_rank if rank is None else min(rank, max_rank))
    shape = tuple(int(d) for d in delta.shape)
    kernel = shape[2:]
    ones = (1,) * len(kernel)
    a = delta.detach().float().reshape(shape[0], -1)
    use_tucker = tucker and any(k > 1 for k in kernel)
    if use_tucker:
        cap = min(shape[0], shape[1]) if cap is None else min(cap, shape[0], shape[1])
    fixed_rank = None
    if mode == "fixed":
        fixed_rank = select_rank(torch.zeros(min(a.shape)), "fixed", param, cap)
    how = choose_method((a.shape[0], a.shape[1]), fixed_rank, mode, method)
    norm = _norm(a)

    if use_tucker:
        return _tucker(a, shape, mode, param, cap, fixed_rank, how, norm)

    u, s, vh = lowrank_svd(a, fixed_rank or min(a.shape), how)
    r = fixed_rank if fixed_rank is not None else select_rank(s, mode, param, cap)
    r = min(r, s.numel())
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if how == "full":  # Eckart–Young: the discarded singular values
        err, norm = _norm(s[r:]), _norm(s)
    else:
        err = _norm(a - up @ down)
    return LowRank(
        up=up.reshape(shape[0], r, *ones).contiguous(),
        down=down.reshape(r, *shape[1:]).contiguous(),
        mid=None,
        rank=r,
        rel_error=_rel(err, norm),
        shape=shape,
        method=how,
    )


def _tucker(
    a: torch.Tensor,
    shape: tuple[int, ...],
    mode: str,
    param: float | None,
    cap: int | None,
    fixed_rank: int | None,
    how: str,
    norm: float,
) -> LowRank:
    """Tucker-2 of the conv ΔW ``a`` (flattened ``(O, I·K)``): see :func:`to_lora`."""
    o, i = shape[0], shape[1]
    kernel = shape[2:]
    k = math.prod(kernel)
    t3 = a.reshape(o, i, k)
    u, s, _ = lowrank_svd(a, fixed_rank or min(a.shape), how)
    r = fixed_rank if fixed_rank is not None else select_rank(s, mode, param, cap)
    r = min(r, o, i)
    uo = u[:, :r]
    # input-side factor: leading left singular vectors of the mode-1 unfolding (I, O·K)
    m1 = t3.permute(1, 0, 2).reshape(i, o * k)
    vi = lowrank_svd(m1, r, choose_method((i, o * k), r, "fixed", how))[0][:, :r]
    for _ in range(TUCKER_SWEEPS):  # HOOI: each factor optimal given the other (small SVDs)
        proj_in = torch.einsum("oik,ij->ojk", t3, vi).reshape(o, r * k)
        uo = torch.linalg.svd(proj_in, full_matrices=False)[0][:, :r]
        proj_out = torch.einsum("oik,or->irk", t3, uo).reshape(i, r * k)
        vi = torch.linalg.svd(proj_out, full_matrices=False)[0][:, :r]
    mid = torch.einsum("or,oik,ij->rjk", uo, t3, vi)  # (r, r, K): core in the (up, down) bases
    ones = (1,) * len(kernel)
    up = uo.reshape(o, r, *ones).contiguous()
    down = vi.T.reshape(r, i, *ones).contiguous()
    mid_t = mid.reshape(r, r, *kernel).contiguous()
    recon = torch.einsum("or,rjk,ij->oik", uo, mid, vi)
    err = _norm(t3 - recon)
    return LowRank(up, down, mid_t, r, _rel(err, norm), shape, how)


def factored_to_lora(
    up: torch.Tensor,
    down: torch.Tensor,
    shape: tuple[int, ...],
    *,
    rank: int | None = None,
    mode: str = "fixed",
    param: float | None = None,
    max_rank: int | None = None,
) -> LowRank:
    """:func:`to_lora` of ΔW = ``up @ down`` without building ΔW: QR of both factors, SVD of the small core.

    ``up`` ``(O, q)`` and ``down`` ``(q, I·∏k)`` are the 2-D factors (any scale already folded in; q may
    exceed the dimensions, e.g. after concatenating several LoRAs); ``shape`` is ΔW's shape ``(O, I, *k)``.
    With ``up = Q_u R_u`` and ``downᵀ = Q_d R_d``, ΔW = Q_u (R_u R_dᵀ) Q_dᵀ, so the SVD of the
    ``min(O, q) × min(I·∏k, q)`` core gives ΔW's exact singular values and vectors. Rank arguments as in
    :func:`to_lora`; the error comes from the discarded singular values. Costs O((O + I·∏k)·q²).
    """
    o = int(shape[0])
    n = math.prod(int(d) for d in shape[1:])
    up2, down2 = up.detach().float().reshape(o, -1), down.detach().float().reshape(-1, n)
    if up2.shape[1] != down2.shape[0]:
        raise InvalidConfigError(
            f"factored_to_lora: inner sizes differ, up {tuple(up.shape)}, down {tuple(down.shape)}"
        )
    if mode == "fixed":
        param = rank if rank is not None else param
        cap = max_rank
    else:
        cap = rank if max_rank is None else (max_rank if rank is None else min(rank, max_rank))
    qu, ru = torch.linalg.qr(up2)
    qd, rd = torch.linalg.qr(down2.T)
    uc, s, vch = torch.linalg.svd(ru @ rd.T, full_matrices=False)
    r = min(select_rank(s, mode, param, cap), int(s.numel()))
    kernel = tuple(int(d) for d in shape[2:])
    new_up = (qu @ uc[:, :r]) * s[:r]
    new_down = vch[:r] @ qd.T
    return LowRank(
        up=new_up.reshape(o, r, *((1,) * len(kernel))).contiguous(),
        down=new_down.reshape(r, *shape[1:]).contiguous(),
        mid=None,
        rank=r,
        rel_error=_rel(_norm(s[r:]), _norm(s)),
        shape=tuple(int(d) for d in shape),
        method="factored",
    )
