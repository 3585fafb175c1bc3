"""What an adapter needs to know about the layer it wraps.

:class:`LayerInfo` is a frozen description of a base layer (Linear, Conv1d/2d/3d, or a norm layer):
its kind, shapes and convolution arguments, plus the one function that runs the layer's operation
with an arbitrary weight. Algorithms never look at the torch module itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerInfo:
    """Shape and operation of one base layer.

    ``kind`` is ``"linear"``, ``"conv"`` or ``"norm"``. ``in_features`` is the weight's input axis size,
    i.e. ``in_channels // groups`` for a grouped conv. ``kernel_size`` is ``()`` for linear and norm.
    """

    kind: str
    out_features: int
    in_features: int
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight: ``(O, I, *k)``, or ``(C,)`` for a norm layer."""
        if self.kind == "norm":
            return (self.out_features,)
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def ndim_spatial(self) -> int:
        return len(self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        """∏k, 1 for linear layers."""
        return prod(self.kernel_size) if self.kernel_size else 1

    @property
    def is_pointwise(self) -> bool:
        """True for Linear and for convs whose kernel is all ones."""
        return all(k == 1 for k in self.kernel_size)

    @classmethod
    def linear(cls, out_features: int, in_features: int, bias: bool = False) -> LayerInfo:
        return cls("linear", out_features, in_features, has_bias=bias)

    @classmethod
    def conv(
        cls,
        out_channels: int,
        in_channels: int,
        kernel_size: tuple[int, ...],
        *,
        stride: tuple[int, ...] | None = None,
        padding: tuple[int, ...] | str | None = None,
        dilation: tuple[int, ...] | None = None,
        groups: int = 1,
        bias: bool = False,
    ) -> LayerInfo:
        n = len(kernel_size)
        return cls(
            "conv",
            out_channels,
            in_channels // groups,
            tuple(kernel_size),
            tuple(stride or (1,) * n),
            padding if isinstance(padding, str) else tuple(padding or (0,) * n),
            tuple(dilation or (1,) * n),
            groups,
            bias,
        )

    @classmethod
    def from_weight(cls, weight_shape: tuple[int, ...] | torch.Size, has_bias: bool = False) -> LayerInfo:
        """Describe a layer from its weight shape alone: 2-D is linear, 3-5-D a conv, 1-D a norm.

        Enough for merging and ΔW (stride and padding do not change the weight math).
        """
        shape = tuple(weight_shape)
        if len(shape) == 1:
            return cls("norm", shape[0], shape[0], has_bias=has_bias)
        if len(shape) == 2:
            return cls.linear(shape[0], shape[1], has_bias)
        if 3 <= len(shape) <= 5:
            return cls.conv(shape[0], shape[1], shape[2:], bias=has_bias)
        raise UnsupportedLayerError(f"a weight of shape {shape} is neither linear, conv nor norm")

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerInfo:
        """Describe a torch layer; raise :class:`UnsupportedLayerError` for anything else."""
        if isinstance(module, nn.Linear):
            return cls.linear(module.out_features, module.in_features, module.bias is not None)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported"
                )
            return cls.conv(
                module.out_channels,
                module.in_channels,
                tuple(module.kernel_size),
                stride=tuple(module.stride),
                padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
                dilation=tuple(module.dilation),
                groups=module.groups,
                bias=module.bias is not None,
            )
        if is_norm_layer(module):
            weight = getattr(module, "weight", None)
            if weight is None:
                raise UnsupportedLayerError(f"{type(module).__name__} has no affine weight")
            return cls("norm", weight.shape[0], weight.shape[0], has_bias=getattr(module, "bias", None) is not None)
        raise UnsupportedLayerError(f"layer type {type(module).__name__} is not supported")

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Run this layer's operation (linear or conv with the layer's arguments) with ``weight``.

        ``weight`` must have shape ``(O', I, *k)`` for any ``O'``; ``x`` is the layer's input.
        """
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv":
            return _CONV_FN[self.ndim_spatial](
                x, weight, bias, self.stride, self.padding, self.dilation, self.groups
            )
        raise UnsupportedLayerError("norm layers have no linear operation")

    def forward_with(
        self, x: torch.Tensor, weight: torch.Tensor, *, pointwise: bool = False, groups: int | None = None
    ) -> torch.Tensor:
        """Run a conv with this layer's stride/padding/dilation, or a 1x1 conv when ``pointwise``.

        Used by factorised bypass paths: the first factor carries the layer's spatial arguments,
        later factors are pointwise. For linear layers it is ``F.linear``.
        """
        if self.kind == "linear":
            return F.linear(x, weight)
        fn = _CONV_FN[self.ndim_spatial]
        if pointwise:
            return fn(x, weight, None, 1, 0, 1, 1 if groups is None else groups)
        return fn(x, weight, None, self.stride, self.padding, self.dilation, self.groups if groups is None else groups)

    def channel_view(self, v: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """Reshape a per-channel vector ``(C,)`` so it broadcasts along ``axis`` of an activation.

        For linear layers the channel axis is the last one; for convs it is axis 1 of ``(N, C, *spatial)``.
        """
        if self.kind == "linear":
            return v
        return v.reshape(-1, *([1] * self.ndim_spatial))


def is_norm_layer(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, and RMSNorm-like modules (a ``weight`` and a ``_norm`` method)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    return "Norm" in name and isinstance(getattr(module, "weight", None), torch.Tensor) and (
        hasattr(module, "_norm") or isinstance(module, nn.modules.normalization.RMSNorm)
    )


def is_adaptable(module: nn.Module) -> bool:
    """True for layers that carry a weight an adapter can change (Linear and Conv1d/2d/3d)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
