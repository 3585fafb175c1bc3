"""Optimisers: AdamW, AdamW 8-bit (bitsandbytes, GPU only), Lion and Prodigy.

``make_optimizer(cfg, groups)`` builds one from the ``[optimizer]`` table. ``groups`` are torch parameter groups,
each carrying its own ``"lr"`` (UNet and text encoder train at different rates); any other key in a group (for
example ``"name"`` or ``"weight_decay"``) is kept and wins over the config. Every optimiser here keeps all of its
state in ``state_dict()`` (tensors per parameter, scalars such as Prodigy's ``d`` in the parameter groups), so a
resumed run continues exactly where it stopped.

Lion and Prodigy are implemented here (no extra dependency):

- Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
  ``u = sign(β1·m + (1−β1)·g)``, ``p ← p·(1 − lr·λ) − lr·u``, ``m ← β2·m + (1−β2)·g``.
- Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free Learner"): Adam whose step
  size is ``d·lr`` where ``d`` estimates the distance to the solution (D-adaptation) and only grows; ``lr`` is a
  multiplier, 1.0 is the intended value.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from lyco_core.errors import InvalidConfigError
from lyco_trainer.config import OptimizerConfig

# The betas each optimiser uses when the config does not set them (the config's own default is AdamW's).
DEFAULT_BETAS: dict[str, tuple[float, float]] = {
    "adamw": (0.9, 0.999),
    "adamw8bit": (0.9, 0.999),
    "lion": (0.9, 0.99),
    "prodigy": (0.9, 0.999),
}


class Lion(torch.optim.Optimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay.

    Per parameter ``p`` with gradient ``g`` and momentum ``m`` (state ``"exp_avg"``, same shape as ``p``)::

        p ← p · (1 − lr · weight_decay)
        p ← p − lr · sign(β1 · m + (1 − β1) · g)
        m ← β2 · m + (1 − β2) · g

    The update has unit magnitude per element, so Lion wants a learning rate about 3–10× smaller than AdamW's
    (and a correspondingly larger weight decay).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        _check_betas(betas)
        if lr <= 0:
            raise InvalidConfigError(f"optimizer: lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr: float = group["lr"]
            beta1, beta2 = group["betas"]
            decay: float = group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                if decay != 0:
                    p.mul_(1.0 - lr * decay)
                update = m.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
                p.add_(update, alpha=-lr)
                m.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss


class Prodigy(torch.optim.Optimizer):
    """Prodigy: Adam with a D-adaptation estimate ``d`` of the distance to the solution.

    Shared scalars (stored in every parameter group, so they survive ``state_dict``): ``d`` (starts at ``d0``),
    ``d_max``, ``d_numerator`` (EMA with ``β3`` of ``Σ (d/d0)·d·lr·⟨g, p0 − p⟩``) and the step counter ``k``.
    Per parameter: ``p0`` (the starting point), ``s`` (EMA of ``(d/d0)·d·lr·g``), ``exp_avg`` and ``exp_avg_sq``
    (Adam moments of ``d·g``). Each step:

    1. ``d_numerator ← β3·d_numerator + Σ_p (d/d0)·dlr·⟨g, p0 − p⟩`` with ``dlr = d·lr·bias_correction``;
       ``m ← β1·m + d(1−β1)·g``, ``v ← β2·v + d²(1−β2)·g²``, ``s ← β3·s + (d/d0)·dlr·g``.
    2. ``d̂ = d_coef · d_numerator / Σ_p ‖s‖₁``; ``d ← min(d_max, d·growth_rate)`` after ``d_max ← max(d_max, d̂)``
       (on the first change from ``d0``, ``d ← max(d, d̂)``).
    3. ``p ← p − λ·dlr·p`` (decoupled decay), ``p ← p − dlr · m / (√v + d·eps)`` — with ``d`` and ``dlr`` as
       computed before step 2, as in the reference.

    ``lr`` is a multiplier on the adapted step (1.0 intended). Parameter groups may carry different ``lr`` values
    (UNet vs text encoder): the estimate ``d`` is shared and each group's step, momentum and ``s`` term use its
    own ``lr`` (with equal ``lr`` everywhere this is exactly the reference algorithm; the reference itself only
    accepts equal values or 0). A group with ``lr == 0`` is frozen and does not feed the estimate.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
    ) -> None:
        _check_betas(betas)
        if d0 <= 0:
            raise InvalidConfigError(f"optimizer: Prodigy d0 must be > 0, got {d0}")
        if lr <= 0:
            raise InvalidConfigError(f"optimizer: lr must be > 0, got {lr}")
        if eps <= 0:
            raise InvalidConfigError(f"optimizer.eps must be > 0, got {eps}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "beta3": beta3,
            "eps": eps,
            "weight_decay": weight_decay,
            "decouple": decouple,
            "use_bias_correction": use_bias_correction,
            "safeguard_warmup": safeguard_warmup,
            "d": d0,
            "d0": d0,
            "d_max": d0,
            "d_numerator": 0.0,
            "d_coef": d_coef,
            "growth_rate": growth_rate,
            "k": 0,
        }
        super().__init__(params, defaults)

    @property
    def d(self) -> float:
        """The current distance estimate (shared by all groups)."""
        return float(self.param_groups[0]["d"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        first = self.param_groups[0]
        beta1, beta2 = first["betas"]
        beta3: float = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k: int = first["k"]
        d: float = first["d"]
        d0: float = first["d0"]
        d_max: float = first["d_max"]
        d_coef: float = first["d_coef"]
        growth_rate: float = first["growth_rate"]
        if first["use_bias_correction"]:
            bias_correction = math.sqrt(1.0 - beta2 ** (k + 1)) / (1.0 - beta1 ** (k + 1))
        else:
            bias_correction = 1.0

        # Accumulate on the device and read back once: one host sync per step, not one per parameter.
        numer_terms: list[torch.Tensor] = []
        denom_terms: list[torch.Tensor] = []
        active: list[tuple[dict[str, Any], float]] = []  # (group, dlr) of groups that step
        for group in self.param_groups:
            group_lr: float = group["lr"]
            if group_lr <= 0:
                continue
            dlr = d * group_lr * bias_correction
            active.append((group, dlr))
            decay: float = group["weight_decay"]
            s_scale = (d / d0) * (d if group["safeguard_warmup"] else dlr)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if decay != 0 and not group["decouple"]:
                    grad = grad.add(p, alpha=decay)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    # An all-zero start (LoRA up matrices) is stored as a 0-d zero: same maths, no copy.
                    state["p0"] = p.detach().clone() if p.any() else torch.zeros((), dtype=p.dtype, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                acc = torch.promote_types(p.dtype, torch.float32)  # fp16/bf16 parameters: reduce in float32
                diff = (state["p0"].to(acc) - p.to(acc)).flatten()
                numer_terms.append(((d / d0) * dlr) * torch.dot(grad.to(acc).flatten(), diff))
                state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1.0 - beta1))
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1.0 - beta2))
                s = state["s"]
                s.mul_(beta3).add_(grad, alpha=s_scale)
                denom_terms.append(s.to(acc).abs().sum())

        if not denom_terms:
            return loss
        dev = denom_terms[0].device
        d_denom = float(torch.stack([t.to(dev) for t in denom_terms]).sum().item())
        if d_denom == 0.0:
            # No gradient signal at all: nothing to adapt and nothing to move (as in the reference).
            return loss
        d_numerator = first["d_numerator"] * beta3 + float(torch.stack([t.to(dev) for t in numer_terms]).sum().item())

        d_hat = d_coef * d_numerator / d_denom
        new_d = d
        if d == d0:
            new_d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        new_d = min(d_max, new_d * growth_rate)

        for group in self.param_groups:
            group["d_numerator"] = d_numerator
            group["d_denom"] = d_denom
            group["d"] = new_d
            group["d_max"] = d_max
            group["d_hat"] = d_hat
            group["k"] = k + 1

        # The step uses the d this step started with (the reference's order).
        for group, dlr in active:
            decay = group["weight_decay"]
            eps: float = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state["step"] += 1
                denom = state["exp_avg_sq"].sqrt().add_(d * eps)
                if decay != 0 and group["decouple"]:
                    p.add_(p, alpha=-decay * dlr)
                p.addcdiv_(state["exp_avg"], denom, value=-dlr)
        return loss


def _check_betas(betas: tuple[float, float]) -> None:
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise InvalidConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)}")


def _prepare_groups(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Copy the groups, keep only trainable parameters, fill ``weight_decay``; errors name the group."""
    if not groups:
        raise InvalidConfigError("optimizer: no parameter groups to train")
    out: list[dict[str, Any]] = []
    for i, g in enumerate(groups):
        name = g.get("name", f"group {i}")
        if "params" not in g or "lr" not in g:
            raise InvalidConfigError(f"optimizer: parameter group {name!r} needs 'params' and 'lr'")
        lr = float(g["lr"])
        if not lr > 0:
            raise InvalidConfigError(f"optimizer: parameter group {name!r} has learning rate {lr}; expected > 0")
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        out.append({**g, "params": params, "lr": lr, "weight_decay": g.get("weight_decay", weight_decay)})
    if not out:
        raise InvalidConfigError("optimizer: no trainable parameters (every parameter has requires_grad=False)")
    return out


def make_optimizer(cfg: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Build the optimiser named by ``cfg.name`` over ``groups``.

    Args:
        cfg: the ``[optimizer]`` table. ``betas`` left unset in the config take the optimiser's usual values
            (:data:`DEFAULT_BETAS`: Lion uses (0.9, 0.99)).
        groups: ``[{"params": [...], "lr": float, ...}, ...]``; parameters without ``requires_grad`` are
            dropped, empty groups skipped.

    Raises:
        InvalidConfigError: no trainable parameters, a bad learning rate, or ``adamw8bit`` without a CUDA
            device / bitsandbytes.
    """
    betas = tuple(cfg.betas) if "betas" in cfg.model_fields_set else DEFAULT_BETAS[cfg.name]
    _check_betas(betas)  # type: ignore[arg-type]
    b: tuple[float, float] = (float(betas[0]), float(betas[1]))
    prepared = _prepare_groups(groups, cfg.weight_decay)
    default_lr = prepared[0]["lr"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(prepared, lr=default_lr, betas=b, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "lion":
        return Lion(prepared, lr=default_lr, betas=b, weight_decay=cfg.weight_decay)
    if cfg.name == "prodigy":
        if any(g["lr"] < 0.1 for g in prepared):
            warnings.warn(
                "optimizer 'prodigy' adapts its step size and treats the learning rate as a multiplier: set "
                "train.unet_lr (and train.text_encoder_lr) near 1.0; small values make it crawl",
                UserWarning,
                stacklevel=2,
            )
        return Prodigy(prepared, lr=default_lr, betas=b, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        devices = {p.device.type for g in prepared for p in g["params"]}
        if devices != {"cuda"}:
            raise InvalidConfigError(
                f"optimizer.name 'adamw8bit' needs every trained parameter on a CUDA device (found "
                f"{', '.join(sorted(devices))}); use 'adamw' on this machine"
            )
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found,import-untyped,unused-ignore]
        except ImportError:
            raise InvalidConfigError(
                "optimizer.name 'adamw8bit' needs bitsandbytes (pip install 'lyco-trainer[gpu]'); or use 'adamw'"
            ) from None
        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(
            prepared, lr=default_lr, betas=b, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        return opt
    raise InvalidConfigError(f"optimizer.name: unknown optimizer {cfg.name!r}")  # pragma: no cover


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The effective learning rate of each parameter group (for Prodigy ``d·lr``, what actually moves weights)."""
    if isinstance(optimizer, Prodigy):
        return [float(g["d"] * g["lr"]) for g in optimizer.param_groups]
    return [float(g["lr"]) for g in optimizer.param_groups]
