"""The torch wrapper that puts one algorithm on one base layer.

:class:`AdapterModule` holds the module's tensors (file names ↔ parameters), its options and multiplier,
and runs the algorithm's math; it never owns the base layer. Several modules (from several networks) may sit
on one layer: the layer's ``forward`` is replaced by a dispatcher that runs them in the order they were applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms import Algorithm
from ..algorithms.base import AdapterOptions
from ..algorithms.dora import init_magnitude
from ..errors import InvalidConfigError
from ..layers import LayerInfo

DORA = "dora_scale"
_STACK = "_lyco_adapters"
_ORIG = "_lyco_orig_forward"


def _attr(name: str) -> str:
    """Parameter attribute for a file suffix (torch forbids dots in parameter names)."""
    return "t_" + name.replace(".", "__")


class AdapterModule(nn.Module):
    """One adapter module on one base layer.

    ``key`` is the file's module key (``lora_unet_…``); ``tensors`` are file tensors to load (None creates
    new ones with the algorithm's initialisation). The base layer is referenced, not registered, so the
    module's ``state_dict`` and ``parameters`` hold the adapter only.
    """

    base: nn.Module  # the wrapped layer; set with object.__setattr__ so it is not registered as a submodule

    def __init__(
        self,
        key: str,
        base: nn.Module,
        algorithm: Algorithm,
        opts: AdapterOptions,
        tensors: Mapping[str, torch.Tensor] | None = None,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        self.key = key
        self.algorithm = algorithm
        self.opts = opts
        self.layer = LayerInfo.from_module(base)
        object.__setattr__(self, "base", base)
        self.multiplier = float(multiplier)
        if tensors is None:
            algorithm.check_options(opts, self.layer)
            weight = self._base_weight()
            tensors = algorithm.init_tensors(self.layer, opts, weight)
            if opts.dora:
                tensors[DORA] = init_magnitude(weight, opts.dora_on_output)
        else:
            tensors = dict(tensors)
            algorithm.check_tensors(tensors, key)
            algorithm.validate(tensors, self.layer, key)
        self._names: tuple[str, ...] = tuple(tensors)
        for name, value in tensors.items():
            value = value.detach().clone()
            if name in algorithm.frozen_names:
                self.register_buffer(_attr(name), value)
            else:
                self.register_parameter(_attr(name), nn.Parameter(value))
        self.scalar: nn.Parameter | None = None
        if opts.use_scalar:
            self.scalar = nn.Parameter(torch.zeros(()))
        self.bypass_mode = self._choose_bypass(opts)
        self.merged = False
        self._backup: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _choose_bypass(self, opts: AdapterOptions) -> bool:
        if self.layer.kind == "norm" or DORA in self._names:
            return False  # norm layers and DoRA always run through the merged weight
        return self.algorithm.default_bypass if opts.bypass is None else bool(opts.bypass)

    # ------------------------------------------------------------------------------------------ tensors
    def _weight_param(self) -> torch.Tensor:
        w: torch.Tensor = self.base.weight  # type: ignore[assignment]  # Linear/Conv/norm weights are tensors
        return w

    def _base_weight(self) -> torch.Tensor:
        return self._weight_param().detach()

    def _base_bias(self) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        return None if b is None else b.detach()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's file tensors, with a trained ``use_scalar`` folded into its target (autograd-aware)."""
        t = {name: getattr(self, _attr(name)) for name in self._names}
        target = self.algorithm.scalar_target_for(t)
        if self.scalar is not None and target is not None:
            t[target] = t[target] * self.scalar
        return t

    def forward_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a forward pass uses: :meth:`tensors`, or the algorithm's training view of them."""
        t = self.tensors()
        return dict(self.algorithm.training_tensors(t, self.opts)) if self.training else t

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """``{"<key>.<suffix>": tensor}`` as written to disk (detached, CPU, contiguous)."""
        out = {}
        for name, value in self.tensors().items():
            v = value.detach().to("cpu")
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[f"{self.key}.{name}"] = v.contiguous()
        return out

    # ------------------------------------------------------------------------------------------ math
    def delta_weight(self) -> torch.Tensor:
        """ΔW at multiplier 1 (W' − W for non-additive algorithms and DoRA), shape of the base weight."""
        w = self._base_weight()
        new_w, _ = self.merged_params(w, self._base_bias(), multiplier=1.0)
        return new_w - w

    def merged_params(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        multiplier: float | None = None,
        row_mask: torch.Tensor | None = None,
        t: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with this adapter merged at ``multiplier`` (default: the module's)."""
        mu = self.multiplier if multiplier is None else multiplier
        t = self.tensors() if t is None else t
        if not self.algorithm.additive:
            return self.algorithm.merge(weight, bias, t, self.layer, mu)
        return self.algorithm.merge(weight, bias, t, self.layer, mu, row_mask=row_mask)

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The base layer's operation with another weight (norm layers included)."""
        if self.layer.kind != "norm":
            return self.layer.forward(x, weight, bias)
        base = self.base
        if isinstance(base, nn.LayerNorm):
            return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        norm: Callable[[torch.Tensor], torch.Tensor] = base._norm  # type: ignore[assignment]  # RMSNorm-like
        y = norm(x.float()).type_as(x) * weight
        return y if bias is None else y + bias

    # ------------------------------------------------------------------------------------------ training regularisers
    def _skip(self) -> bool:
        return bool(self.training and self.opts.module_dropout > 0 and torch.rand(()) < self.opts.module_dropout)

    def _rank_mask(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        p = self.opts.rank_dropout
        if not self.training or p <= 0:
            return None
        mask = (torch.rand(n, device=device) > p).to(dtype)
        if self.opts.rank_dropout_scale:
            mask = mask / mask.mean().clamp_min(1e-6)
        return mask

    def _hidden_hook(self, h: torch.Tensor) -> torch.Tensor:
        axis = -1 if self.layer.kind == "linear" else 1
        mask = self._rank_mask(h.shape[axis], h.device, h.dtype)
        if mask is None:
            return h
        return h * (mask if axis == -1 else mask.reshape(-1, *([1] * (h.ndim - 2))))

    # ------------------------------------------------------------------------------------------ forward
    def forward_alone(self, x: torch.Tensor, orig_forward) -> torch.Tensor:  # type: ignore[no-untyped-def]
        """The layer's output when this is the only active adapter on it."""
        if self._skip():
            return orig_forward(x)
        if not self.bypass_mode:
            w, b = self._base_weight(), self._base_bias()
            mask = self._rank_mask(self.layer.out_features, x.device, w.dtype) if self.algorithm.additive else None
            return self._op(x, *self.merged_params(w, b, row_mask=mask, t=self.forward_tensors()))
        return self.forward_stacked(x, orig_forward(x))

    def forward_stacked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output given ``y``, the output of the layer and of the adapters applied before."""
        if self._skip():
            return y
        algo, mu = self.algorithm, self.multiplier
        t = self.forward_tensors()
        w, b = self._base_weight(), self._base_bias()
        if not algo.additive:
            return algo.bypass(x, y, t, self.layer, mu, base_weight=w, base_bias=b)
        dropout = self.training and self.opts.dropout > 0
        if self.bypass_mode:
            hook = self._hidden_hook if self.training and self.opts.rank_dropout > 0 else None
            if not dropout:  # the common case: let the algorithm add its part to y directly
                return algo.bypass(x, y, t, self.layer, mu, base_weight=w, base_bias=b, hidden_hook=hook)
            zero = torch.zeros((), dtype=y.dtype, device=y.device)
            c = algo.bypass(x, zero, t, self.layer, mu, base_weight=w, base_bias=b, hidden_hook=hook)
        else:
            mask = self._rank_mask(self.layer.out_features, x.device, w.dtype)
            new_w, new_b = self.merged_params(w, b, row_mask=mask, t=t)
            db = None if new_b is None else (new_b - b if b is not None else new_b)
            c = self._op(x, new_w - w, db)  # every additive op is linear in (W, b)
        if dropout:
            c = F.dropout(c, self.opts.dropout)
        return y + c

    # ------------------------------------------------------------------------------------------ attach / merge
    def apply_to_base(self) -> None:
        """Attach to the base layer (stackable: other adapters on the same layer stay active)."""
        stack: list[AdapterModule] | None = self.base.__dict__.get(_STACK)
        if stack is None:
            stack = []
            self.base.__dict__[_STACK] = stack
            self.base.__dict__[_ORIG] = self.base.__dict__.get("forward")
            self.base.forward = _make_dispatch(self.base)
        if self in stack:
            raise InvalidConfigError(f"{self.key}: adapter applied twice")
        stack.append(self)

    def remove_from_base(self) -> None:
        """Detach from the base layer; the layer's own forward comes back when no adapter is left."""
        stack: list[AdapterModule] | None = self.base.__dict__.get(_STACK)
        if not stack or self not in stack:
            return
        stack.remove(self)
        if not stack:
            orig = self.base.__dict__.pop(_ORIG)
            del self.base.__dict__[_STACK]
            if orig is None:
                del self.base.forward
            else:
                self.base.forward = orig

    @property
    def applied(self) -> bool:
        return self in self.base.__dict__.get(_STACK, ())

    @torch.no_grad()
    def merge_into_base(self, multiplier: float | None = None) -> None:
        """Write the merged weights into the base layer (exactly reversible with :meth:`unmerge_from_base`)."""
        if self.merged:
            raise InvalidConfigError(f"{self.key}: already merged")
        w, b = self._weight_param(), getattr(self.base, "bias", None)
        self._backup = (w.detach().clone(), None if b is None else b.detach().clone())
        new_w, new_b = self.merged_params(w.detach(), None if b is None else b.detach(), multiplier)
        w.copy_(new_w.to(w.dtype))
        if new_b is not None:
            if b is None:
                raise InvalidConfigError(f"{self.key}: the adapter changes a bias the base layer does not have")
            b.copy_(new_b.to(b.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge_from_base(self) -> None:
        if not self.merged or self._backup is None:
            return
        w0, b0 = self._backup
        self._weight_param().copy_(w0)
        if b0 is not None:
            bias: torch.Tensor = self.base.bias  # type: ignore[assignment]
            bias.copy_(b0)
        self._backup = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"key={self.key}, algo={self.algorithm.name}, layer={self.layer.kind}{self.layer.weight_shape}, " \
            f"multiplier={self.multiplier}, bypass={self.bypass_mode}"


def _make_dispatch(base: nn.Module):  # type: ignore[no-untyped-def]
    cls_forward = type(base).forward

    def orig(x: torch.Tensor) -> torch.Tensor:
        f = base.__dict__.get(_ORIG)
        return f(x) if f is not None else cls_forward(base, x)

    def dispatch(x: torch.Tensor, *args, **kwargs):  # type: ignore[no-untyped-def]
        active = [a for a in base.__dict__[_STACK] if not a.merged]
        if args or kwargs:  # an unusual call signature: adapters only know the plain one
            raise TypeError(f"{type(base).__name__} with adapters takes one input, got extra arguments")
        if not active:
            return orig(x)
        if len(active) == 1:
            return active[0].forward_alone(x, orig)
        y = orig(x)
        for a in active:
            y = a.forward_stacked(x, y)
        return y

    return dispatch
