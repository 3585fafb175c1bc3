"""DiagOFT (to be implemented)."""

from __future__ import annotations

from .base import Algorithm


class DiagOFT(Algorithm):
    name = "diag-oft"
    aliases = ("oft",)

    def init_tensors(self, layer, opts, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("DiagOFT")

    def delta_weight(self, t, layer, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("DiagOFT")
