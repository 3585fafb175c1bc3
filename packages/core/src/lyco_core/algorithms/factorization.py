"""Factorisations of a dimension, used by LoKr (Kronecker factors) and Diag-OFT/BOFT (block sizes)."""

from __future__ import annotations

import math

from ..errors import InvalidConfigError


def factorize(n: int, factor: int = -1) -> tuple[int, int]:
    """Split ``n`` into ``(m, n/m)`` with ``m ≤ n/m`` (LyCORIS's rule, which LoKr files depend on).

    * ``factor > 0`` dividing ``n``: ``(min(f, n/f), max(f, n/f))``.
    * otherwise the largest divisor ``m ≤ min(f, √n)`` (no cap when ``factor < 0``); ``factor`` 0 or 1
      gives ``(1, n)``.

    Examples: ``factorize(1024, 64) == (16, 64)``, ``factorize(360) == (18, 20)``,
    ``factorize(320, 7) == (5, 64)``, ``factorize(127) == (1, 127)``.
    """
    if n < 1:
        raise InvalidConfigError(f"factor: cannot factorise dimension {n}")
    if factor > 0 and n % factor == 0:
        a, b = factor, n // factor
        return (a, b) if a <= b else (b, a)
    cap = n if factor < 0 else factor
    best = 1
    for m in range(1, math.isqrt(n) + 1):
        if m > cap:
            break
        if n % m == 0:
            best = m
    return best, n // best


def power2_factorize(n: int, max_block: int = -1) -> tuple[int, int]:
    """BOFT blocks: ``(b, k)`` with ``b`` the largest even divisor of ``n``, ``b ≤ max_block``, such that
    ``k = n/b`` is a power of two. Raises :class:`InvalidConfigError` when none exists
    (e.g. ``n=320`` with ``max_block < 10``).
    """
    cap = n if max_block < 0 else max_block
    best = 0
    for b in range(2, min(cap, n) + 1, 2):
        if n % b == 0:
            k = n // b
            if k & (k - 1) == 0:
                best = b
    if best == 0:
        raise InvalidConfigError(
            f"dim: no even block size ≤ {cap} splits {n} channels into a power-of-two number of blocks "
            "(BOFT); raise dim"
        )
    return best, n // best
