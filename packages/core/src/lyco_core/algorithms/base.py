"""The contract every adapter algorithm implements.

An :class:`Algorithm` is stateless: it turns a dict of *file tensors* (named exactly as in a
kohya/LyCORIS file, e.g. ``lora_down.weight``, ``alpha``) plus the :class:`~lyco_core.layers.LayerInfo`
of the base layer into a weight change, a merged weight, or a bypass output. Modules, networks, file
readers and file operations all go through these methods, so each rule exists once.

Conventions used by every method:

* ``t`` is a mapping from suffix (``"lora_down.weight"``) to tensor, for one module.
* ``delta_weight`` returns ΔW *including* the algorithm's own scale (α/r …) and *excluding* the
  user multiplier μ. Its shape is ``layer.weight_shape``.
* ``merge`` returns the weights at multiplier μ; ``bypass`` returns the layer output at μ given the
  base output, and must equal ``layer.forward(x, *merge(...))`` (the contract tests check this).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import CorruptFileError, IncompatibleBaseError, InvalidConfigError
from ..layers import LayerInfo
from .dora import dora_merge, magnitude_on_output

Tensors = Mapping[str, torch.Tensor]
HiddenHook = Callable[[torch.Tensor], torch.Tensor]


class AdapterOptions(BaseModel):
    """Options of one adapter module, after the network resolved conv/linear dims and overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algo: str = Field("lora", description="algorithm name or alias (see `lyco_core.algorithms.names()`)")
    dim: int = Field(4, ge=1, description="rank r (LoRA family), block-size hint (OFT/BOFT)")
    alpha: float | None = Field(1.0, description="α; the scale is α/r. None or 0 means α = r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter output (bypass only)")
    rank_dropout: float = Field(0.0, ge=0, lt=1, description="dropout over ranks / output rows")
    rank_dropout_scale: bool = Field(False, description="divide the rank-dropout mask by its mean")
    module_dropout: float = Field(0.0, ge=0, lt=1, description="skip the whole module with this probability")
    use_tucker: bool = Field(False, description="Tucker core for k≠1 convs (LoRA/LoHa/LoKr)")
    use_scalar: bool = Field(False, description="train an extra scalar that multiplies ΔW")
    rs_lora: bool = Field(False, description="rank-stabilised scale α/√r")
    dora: bool = Field(False, description="DoRA weight decomposition (LoRA/LoHa/LoKr)")
    dora_on_output: bool = Field(True, description="DoRA magnitude per output channel (else per input)")
    factor: int = Field(-1, description="LoKr Kronecker factor; -1 = as balanced as possible")
    decompose_both: bool = Field(False, description="LoKr: low-rank w1 as well")
    full_matrix: bool = Field(False, description="LoKr: never decompose w2")
    unbalanced_factorization: bool = Field(False, description="LoKr: swap the output factors")
    block_size: int = Field(4, ge=1, description="DyLoRA rank block size")
    constraint: float = Field(0.0, ge=0, description="OFT/BOFT: bound on ‖Q‖_F / O (0 = none)")
    rescaled: bool = Field(False, description="OFT/BOFT: learn a per-output rescale")
    train_on_input: bool = Field(False, description="(IA)³: scale the input side")
    bypass: bool | None = Field(None, description="run y=f(x)+μΔ(x) through the factors; None = algorithm default")

    @field_validator("alpha")
    @classmethod
    def _alpha_finite(cls, v: float | None) -> float | None:
        if v is not None and not torch.isfinite(torch.tensor(v)):
            raise ValueError("alpha must be finite")
        return v

    def effective_alpha(self) -> float:
        """α as used in the scale: α, or r when α is None/0."""
        return float(self.dim) if not self.alpha else float(self.alpha)


class Algorithm(ABC):
    """Stateless description and math of one adapter algorithm."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})
    #: suffixes whose presence identifies the algorithm in a file (any one suffices)
    detector_keys: ClassVar[tuple[str, ...]] = ()
    #: every suffix this algorithm may store
    tensor_names: ClassVar[tuple[str, ...]] = ()
    #: suffixes that are stored but never trained
    frozen_names: ClassVar[frozenset[str]] = frozenset({"alpha"})
    #: which tensor a trained `use_scalar` is folded into on save (None: option unsupported)
    scalar_target: ClassVar[str | None] = None
    supports_dora: ClassVar[bool] = False
    #: True when ΔW depends on the base weight (GLoRA, (IA)³, OFT, BOFT)
    needs_base_weight: ClassVar[bool] = False
    #: True when the algorithm's bypass path is cheaper than building ΔW (used when `bypass` is None)
    default_bypass: ClassVar[bool] = False
    #: True when W' = W + μΔW (and b' = b + μΔb); False for multiplicative/rotational algorithms
    additive: ClassVar[bool] = True

    # ----------------------------------------------------------------------------- detection
    def matches(self, t: Tensors) -> bool:
        """Whether a module's tensors belong to this algorithm (the registry asks in priority order)."""
        return any(k in t for k in self.detector_keys)

    # ----------------------------------------------------------------------------- creation
    @abstractmethod
    def init_tensors(
        self, layer: LayerInfo, opts: AdapterOptions, base_weight: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Freshly initialised file tensors (fp32, CPU) for a new module on ``layer``.

        With ``opts.use_scalar`` the tensor that is normally zero is initialised randomly too (the
        scalar, held by the module and starting at 0, keeps ΔW = 0).
        """

    def training_tensors(self, t: Tensors, opts: AdapterOptions) -> Tensors:
        """The tensors one training forward uses (DyLoRA samples a rank here). Default: ``t`` itself."""
        return t

    def scalar_target_for(self, t: Tensors) -> str | None:
        """The tensor a trained scalar is folded into, for these tensors (LoKr picks by variant)."""
        return self.scalar_target

    # ----------------------------------------------------------------------------- math
    @abstractmethod
    def delta_weight(
        self, t: Tensors, layer: LayerInfo, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ΔW of shape ``layer.weight_shape`` including the algorithm's scale, excluding μ."""

    def delta_bias(self, t: Tensors, layer: LayerInfo) -> torch.Tensor | None:
        """Δb of shape ``(O,)``, or None when the algorithm does not change the bias."""
        return None

    def merge(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        t: Tensors,
        layer: LayerInfo,
        multiplier: float = 1.0,
        *,
        row_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights at multiplier μ: ``W + μΔW`` and ``b + μΔb``, or the DoRA rule when ``dora_scale`` is present.

        ``row_mask`` ``(O,)`` multiplies ΔW's output rows (rank dropout in rebuild mode, training only).
        """
        dw = self.delta_weight(t, layer, weight if self.needs_base_weight else None).to(weight.dtype)
        if row_mask is not None:
            dw = dw * row_mask.reshape(-1, *([1] * (dw.ndim - 1))).to(dw.dtype)
        if "dora_scale" in t:
            return dora_merge(weight, dw, t["dora_scale"], multiplier), bias
        new_w = weight + multiplier * dw
        db = self.delta_bias(t, layer)
        new_b = bias
        if db is not None:
            base_b = bias if bias is not None else torch.zeros_like(db, dtype=weight.dtype)
            new_b = base_b + multiplier * db.to(weight.dtype)
        return new_w, new_b

    def bypass(
        self,
        x: torch.Tensor,
        base_out: torch.Tensor,
        t: Tensors,
        layer: LayerInfo,
        multiplier: float = 1.0,
        *,
        base_weight: torch.Tensor | None = None,
        base_bias: torch.Tensor | None = None,
        hidden_hook: HiddenHook | None = None,
    ) -> torch.Tensor:
        """Layer output at μ from the base output ``base_out = f(x)``.

        The default builds ΔW and runs one extra layer op; algorithms override it with a cheaper path.
        ``hidden_hook`` (rank dropout during training) is applied to the low-rank hidden activation by
        algorithms that have one, and otherwise to the output channels of the adapter's part (which equals
        masking ΔW's output rows, LyCORIS's rank dropout in rebuild mode).
        """
        if not self.additive:
            w, b = self.merge(base_weight, base_bias, t, layer, multiplier)  # type: ignore[arg-type]
            return layer.forward(x, w, b)
        dw = self.delta_weight(t, layer, base_weight if self.needs_base_weight else None)
        c = multiplier * layer.forward(x, dw.to(x.dtype))
        out = base_out + (c if hidden_hook is None else hidden_hook(c))
        db = self.delta_bias(t, layer)
        if db is not None:
            out = out + multiplier * layer.channel_view(db.to(out.dtype))
        return out

    # ----------------------------------------------------------------------------- file facts
    def rank(self, t: Tensors) -> int | None:
        """The rank r the scale divides by, or None when the algorithm has none."""
        return None

    def scale(self, t: Tensors) -> float:
        """α/r from the stored alpha (1 when alpha is missing or there is no rank)."""
        r = self.rank(t)
        if r is None or "alpha" not in t:
            return 1.0
        return float(t["alpha"].float().item()) / r

    def describe(self, t: Tensors) -> dict[str, object]:
        """A short, JSON-able summary of one module (rank, alpha, variant flags)."""
        out: dict[str, object] = {"algo": self.name}
        r = self.rank(t)
        if r is not None:
            out["rank"] = r
        if "alpha" in t:
            out["alpha"] = float(t["alpha"].float().item())
        if "dora_scale" in t:
            out["dora"] = "output" if magnitude_on_output(t["dora_scale"]) else "input"
        return out

    def implied_weight_shape(self, t: Tensors) -> tuple[int, ...] | None:
        """The base weight shape the tensors imply on their own, or None when they do not fix it.

        Flattened conv factors give the 2-D shape ``(O, I·∏k)``. File readers use it to check that a module's
        tensors fit each other without the base model.
        """
        return None

    def check_tensors(self, t: Tensors, key: str) -> None:
        """Every tensor is one of this algorithm's, and floating point unless it is a frozen flag/alpha."""
        for name, value in t.items():
            if name not in self.tensor_names:
                raise CorruptFileError(f"{key}.{name}: not a {self.name} tensor")
            if name not in self.frozen_names and not value.is_floating_point():
                raise CorruptFileError(f"{key}.{name}: integer dtype {value.dtype} where floats belong")

    def validate(self, t: Tensors, layer: LayerInfo, key: str) -> None:
        """Check that the tensors fit each other and ``layer``; raise naming ``key`` when not.

        The default compares ΔW's shape with the layer's weight shape; algorithms add partner checks.
        """
        if layer.kind not in self.layer_kinds:
            raise IncompatibleBaseError(f"{key}: {self.name} cannot be applied to a {layer.kind} layer")
        try:
            dw = self.delta_weight(t, layer, torch.zeros(layer.weight_shape) if self.needs_base_weight else None)
        except (RuntimeError, ValueError, IndexError) as e:
            raise CorruptFileError(f"{key}: tensors of this {self.name} module do not fit together ({e})") from None
        if tuple(dw.shape) != layer.weight_shape and dw.numel() != math.prod(layer.weight_shape):
            raise IncompatibleBaseError(
                f"{key}: {self.name} weight change has shape {tuple(dw.shape)}, the layer's weight is "
                f"{layer.weight_shape}"
            )

    def check_options(self, opts: AdapterOptions, layer: LayerInfo) -> None:
        """Reject options that make no sense for this algorithm/layer with an error naming the option."""
        if opts.dora and not self.supports_dora:
            raise InvalidConfigError(f"dora: not supported by {self.name}")
        if opts.use_scalar and self.scalar_target is None:
            raise InvalidConfigError(f"use_scalar: not supported by {self.name}")


def alpha_tensor(value: float) -> torch.Tensor:
    """The 0-dim float32 alpha every LoRA-family module stores."""
    return torch.tensor(float(value), dtype=torch.float32)


def flat2d(w: torch.Tensor) -> torch.Tensor:
    """``(A, B, *k) → (A, B·∏k)``: the 2-D view used by factorised conv rules."""
    return w.reshape(w.shape[0], -1)
