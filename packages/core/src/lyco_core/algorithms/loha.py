"""LoHa (to be implemented)."""

from __future__ import annotations

from .base import Algorithm


class LoHa(Algorithm):
    name = "loha"

    def init_tensors(self, layer, opts, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("LoHa")

    def delta_weight(self, t, layer, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("LoHa")
