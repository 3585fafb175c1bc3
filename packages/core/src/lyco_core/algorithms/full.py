"""Full (native) fine-tune: the file stores the weight difference itself.

Tensors (LyCORIS names): ``diff`` with the base weight's shape ``(O, I/g, *k)``, and ``diff_b (O,)``
when the layer has a bias. There is no alpha and no rank: ``W' = W + μ·diff``, ``b' = b + μ·diff_b``.

LyCORIS refuses bypass mode for this algorithm; here bypass works but is off by default, because it
costs a second full-size layer op (``y = f(x) + μ·f(x; diff) + μ·diff_b``) for no saving.
"""

from __future__ import annotations

import torch

from ..errors import CorruptFileError, IncompatibleBaseError
from ..layers import LayerInfo
from .base import AdapterOptions, Algorithm, Tensors

DIFF, DIFF_B = "diff", "diff_b"


class Full(Algorithm):
    name = "full"
    aliases = ("native", "diff")
    description = "full fine-tune: stores ΔW (and Δb) directly"
    detector_keys = (DIFF,)
    tensor_names = (DIFF, DIFF_B)
    frozen_names = frozenset()
    default_bypass = False

    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Zero ``diff`` (and ``diff_b`` for a biased layer): the module starts at the base weights."""
        t = {DIFF: torch.zeros(layer.weight_shape)}
        if layer.has_bias:
            t[DIFF_B] = torch.zeros(layer.out_features)
        return t

    def delta_weight(self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        return t[DIFF].reshape(layer.weight_shape)

    def delta_bias(self, t: Tensors, layer: LayerInfo) -> torch.Tensor | None:
        return t.get(DIFF_B)

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        if DIFF not in t:
            raise CorruptFileError(f"{key}.{DIFF}: missing from this {self.name} module")
        if tuple(t[DIFF].shape) != layer.weight_shape:
            raise IncompatibleBaseError(
                f"{key}.{DIFF}: shape {tuple(t[DIFF].shape)}, the layer's weight is {layer.weight_shape}"
            )
        if DIFF_B in t and tuple(t[DIFF_B].shape) != (layer.out_features,):
            raise IncompatibleBaseError(
                f"{key}.{DIFF_B}: shape {tuple(t[DIFF_B].shape)}, the layer has {layer.out_features} outputs"
            )
