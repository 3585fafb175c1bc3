"""Norm (to be implemented)."""

from __future__ import annotations

from .base import Algorithm


class Norm(Algorithm):
    name = "norm"

    def init_tensors(self, layer, opts, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("Norm")

    def delta_weight(self, t, layer, base_weight=None):  # type: ignore[no-untyped-def]
        raise NotImplementedError("Norm")
