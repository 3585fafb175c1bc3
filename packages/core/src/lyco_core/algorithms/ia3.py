"""IA3 (to be implemented)."""

from __future__ import annotations

from .base import Algorithm


class IA3(Algorithm):
    name = "ia3"

    def init_tensors(self, layer, opts, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("IA3")

    def delta_weight(self, t, layer, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("IA3")
