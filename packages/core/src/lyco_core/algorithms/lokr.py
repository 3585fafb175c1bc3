"""LoKr (to be implemented)."""

from __future__ import annotations

from .base import Algorithm


class LoKr(Algorithm):
    name = "lokr"

    def init_tensors(self, layer, opts, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("LoKr")

    def delta_weight(self, t, layer, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("LoKr")
