"""Rescale an adapter file: fold a multiplier into it, or change α while keeping ΔW.

``--multiplier M``: the output loaded at strength 1 equals the input at strength M, for every consumer.

* Additive algorithms (W' = W + μ·ΔW, ΔW linear in one tensor): that tensor is multiplied by M, never α,
  because consumers disagree on what α = 0 or a missing α means (spec ecosystem-formats §2.2) but all of them
  multiply ΔW by the stored factors. LoRA/LoCon/DyLoRA: ``lora_up`` (ΔW = (α/r)·up·[mid]·down). LoHa:
  ``hada_w1_a`` (one factor of the first Hadamard half; Tucker layout too). LoKr: ``lokr_w1`` or ``lokr_w1_a``
  (kron is linear in w1; this also holds for full-matrix modules, whose scale is 1 whatever α says). GLoRA:
  ``a2`` and ``b2`` (ΔW = W·a1·a2 + b1·b2; also linear in both for A1111's older ``b2@b1 + W@a2@a1`` reading).
  Full: ``diff`` and ``diff_b``. Norm: ``w_norm`` and ``b_norm``.
* (IA)³: W' = W ⊙ (1 + μ·w), so ``weight`` ← M·w.
* DoRA (any algorithm with ``dora_scale``) and OFT/BOFT are not linear in μ: W' = W + μ·(W_d − W) with
  W_d = (W + ΔW)·m/‖W + ΔW‖, or μR + (1−μ)I for OFT. With the base weights they become exact Full modules,
  ``diff`` = merge(W, b, M) − W (and ``diff_b`` when the bias changes), which are then only exact for that
  base. Without a base they are refused. M = 1 needs no base (the file is copied).

``--alpha A``: the stored α becomes A and the factor rescaled above (LoRA ``lora_up``, LoHa ``hada_w1_a``,
LoKr ``lokr_w1(_a)``, GLoRA ``a2`` and ``b2``) is multiplied by old_scale/new_scale, so ΔW is unchanged
(DoRA's W_d depends on ΔW only, so it is unchanged too). The scale is α_file/r as every consumer computes it
(rs-LoRA stores α·√r: A is the stored value). Left unchanged, with a note: modules without α ((IA)³, Full,
Norm), OFT/BOFT (their ``alpha`` is the constraint), LoKr full-matrix modules (scale 1 whatever α is, in A1111
and ComfyUI), and modules with α = 0 (disabled in A1111/ComfyUI/PEFT, scale 1 in kohya: changing it would
change one of the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint.weights import BaseLike, WeightAndBias, base_getter
from ..errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError, UnsupportedLayerError
from ..files import ModuleTensors, read_adapter, write_adapter
from ..progress import ProgressCallback, progress
from .report import ModuleReport, OpReport

#: algorithms whose merge is not linear in μ (DoRA is detected by its ``dora_scale`` tensor)
NONLINEAR = frozenset({"diag-oft", "boft"})
#: algorithms whose stored alpha is a LoRA-style scale α/r
ALPHA_ALGORITHMS = frozenset({"lora", "dylora", "loha", "lokr", "glora"})


def multiplier_targets(m: ModuleTensors) -> tuple[str, ...]:
    """The tensors of ``m`` that ΔW (or (IA)³'s w) is linear in, jointly: scaling all of them by M scales
    the module's effect by M. Raises :class:`UnsupportedLayerError` for an algorithm without such a rule."""
    t, name = m.tensors, m.algorithm.name
    if name in ("lora", "dylora"):
        return ("lora_up.weight",)
    if name == "loha":
        return ("hada_w1_a",)
    if name == "lokr":
        return ("lokr_w1",) if "lokr_w1" in t else ("lokr_w1_a",)
    if name == "glora":
        return ("a2.weight", "b2.weight")
    if name == "ia3":
        return ("weight",)
    if name == "full":
        return tuple(n for n in ("diff", "diff_b") if n in t)
    if name == "norm":
        return tuple(n for n in ("w_norm", "b_norm") if n in t)
    raise UnsupportedLayerError(f"{m.key}: rescale has no rule for the {name} algorithm")


def is_nonlinear(m: ModuleTensors) -> bool:
    """Whether the module's effect is not linear in the multiplier (DoRA, OFT, BOFT)."""
    return "dora_scale" in m.tensors or m.algorithm.name in NONLINEAR


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t·factor`` computed in float32 (float64 stays float64) and returned in ``t``'s dtype."""
    wide = t.double() if t.dtype == torch.float64 else t.float()
    return (wide * factor).to(t.dtype)


def _to_full(m: ModuleTensors, w: torch.Tensor, b: torch.Tensor | None, multiplier: float) -> ModuleTensors:
    """An exact Full module: ``diff`` = merge(W, b, μ) − W (and ``diff_b`` when the bias changes), in float32
    (float64 for a float64 base) and then in the dtype of the module's own floating tensors."""
    from ..algorithms import get

    wide = torch.float64 if w.dtype == torch.float64 else torch.float32
    w32, b32 = w.to(wide), None if b is None else b.to(wide)
    try:
        new_w, new_b = m.merge(w32, b32, multiplier)
    except (IncompatibleBaseError, ValueError) as e:
        raise IncompatibleBaseError(f"{m.key}: does not fit the base layer of shape {tuple(w.shape)} ({e})") from None
    dtype = next((v.dtype for v in m.tensors.values() if v.is_floating_point() and v.ndim > 0), torch.float32)
    t = {"diff": (new_w - w32).to(dtype)}
    if new_b is not None and (b32 is None or not torch.equal(new_b, b32)):
        t["diff_b"] = (new_b - (b32 if b32 is not None else 0)).to(dtype)
    return ModuleTensors(m.key, get("full"), t)


def _rescale_multiplier(
    m: ModuleTensors, multiplier: float, get_base: Callable[[str], WeightAndBias] | None
) -> tuple[ModuleTensors, str, tuple[int, ...] | None]:
    """The module scaled by ``multiplier``, a note, and the ΔW shape when the module became Full."""
    if is_nonlinear(m):
        what = "DoRA" if "dora_scale" in m.tensors else m.algorithm.name
        if multiplier == 1.0:
            return m, f"{what}: unchanged (multiplier 1)", None
        if get_base is None:  # caught by the caller first; kept for direct use
            raise InvalidConfigError(f"{m.key}: {what} needs --base to rescale")
        w, b = get_base(m.key)
        note = f"{what} is not linear in the multiplier: converted to an exact full diff for this base"
        return _to_full(m, w, b, multiplier), note, tuple(w.shape)
    names = multiplier_targets(m)
    t = dict(m.tensors)
    for n in names:
        t[n] = _scaled(t[n], multiplier)
    return ModuleTensors(m.key, m.algorithm, t), f"{' and '.join(names)} ×{multiplier:g}", None


def _lokr_full_matrix(m: ModuleTensors) -> bool:
    return m.algorithm.name == "lokr" and m.algorithm.rank(m.tensors) is None


def _rescale_alpha(m: ModuleTensors, alpha: float, dtype: torch.dtype | None) -> tuple[ModuleTensors, str]:
    """The module with stored α = ``alpha`` and the same ΔW, and a note (unchanged modules say why)."""
    name, t = m.algorithm.name, m.tensors
    if name in NONLINEAR:
        return m, "unchanged: the OFT/BOFT alpha is the constraint, not a scale"
    if name not in ALPHA_ALGORITHMS:
        return m, f"unchanged: {name} has no alpha"
    if _lokr_full_matrix(m):
        return m, "unchanged: LoKr full-matrix module, its scale is 1 whatever alpha is"
    r = m.algorithm.rank(t)
    if r is None:
        return m, f"unchanged: {name} module without a rank"
    old = t.get("alpha")
    if old is not None and float(old.float().item()) == 0.0:
        return m, "unchanged: alpha 0 (A1111/ComfyUI/PEFT disable the module, kohya reads it as alpha = rank)"
    old_scale = 1.0 if old is None else float(old.float().item()) / r
    store = dtype if dtype is not None else old.dtype if old is not None and old.is_floating_point() else torch.float32
    new_alpha = torch.tensor(alpha, dtype=torch.float64).to(store)
    new_scale = float(new_alpha.double().item()) / r
    if new_scale == 0.0 or not math.isfinite(new_scale):
        raise InvalidConfigError(f"--alpha: {alpha} is stored as {float(new_alpha.item())} in {store}, which is 0")
    ratio = old_scale / new_scale
    out = dict(t)
    for n in multiplier_targets(m):
        out[n] = _scaled(out[n], ratio)
    out["alpha"] = new_alpha
    note = f"alpha {'(none)' if old is None else f'{float(old.float().item()):g}'} → {float(new_alpha.item()):g}"
    if name == "glora":
        note += " (A1111 ignores GLoRA alpha)"
    return ModuleTensors(m.key, m.algorithm, out), note


def rescale_adapter(
    path: str | Path,
    output: str | Path,
    *,
    multiplier: float | None = None,
    alpha: float | None = None,
    base: BaseLike | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    callback: ProgressCallback | None = None,
) -> OpReport:
    """Write ``output``: the adapter at ``path`` with ``multiplier`` folded in, or with stored α = ``alpha``.

    Exactly one of ``multiplier`` (any finite number; 0 gives an adapter with no effect) and ``alpha``
    (positive, finite) is given. ``base`` (a base model path, key → (W, b) as a callable or mapping, or a
    BaseCheckpoint; file keys go through ``base.resolve`` when it has one) is needed with ``multiplier`` ≠ 1
    when the file has DoRA or OFT/BOFT modules; those become Full ``diff`` modules exact for that base.
    ``dtype`` casts the written floating tensors (default: each tensor keeps its dtype; factors are rescaled
    in float32). Refuses to replace ``output`` unless ``overwrite``. Tensors the reader does not understand
    are not written and are listed in ``dropped``.
    """
    if (multiplier is None) == (alpha is None):
        raise InvalidConfigError("rescale: give exactly one of --multiplier and --alpha")
    if multiplier is not None and not math.isfinite(multiplier):
        raise InvalidConfigError(f"--multiplier: must be a finite number, got {multiplier}")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise InvalidConfigError(f"--alpha: must be a positive finite number, got {alpha}")
    if Path(output).exists() and not overwrite:  # fail before the work; write_adapter checks again
        raise FileExistsLycoError(f"{output} exists; pass overwrite/--force")
    f = read_adapter(path)
    if multiplier is not None and multiplier != 1.0 and base is None:
        first = next((k for k, m in sorted(f.modules.items()) if is_nonlinear(m)), None)
        if first is not None:
            m = f.modules[first]
            what = "DoRA" if "dora_scale" in m.tensors else m.algorithm.name.upper()
            raise InvalidConfigError(
                f"{path}: {first} is {what}, whose effect is not linear in the multiplier; rescaling it needs the "
                "base model (--base BASE) to write it as an exact full weight difference"
            )
    if isinstance(base, str | Path):
        from ..checkpoint import open_base

        with open_base(base) as ckpt:
            return rescale_adapter(path, output, multiplier=multiplier, alpha=alpha, base=ckpt, dtype=dtype,
                                   overwrite=overwrite, callback=callback)
    get_base = None if base is None else base_getter(base)
    report = OpReport(operation="rescale", output=str(output))
    out: dict[str, ModuleTensors] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    items = sorted(f.modules.items())
    for key, m in progress(items, len(items), "rescale", "modules", callback):
        if multiplier is not None:
            new, note, shape = _rescale_multiplier(m, multiplier, get_base)
            if shape is not None:
                shapes[key] = shape
        else:
            assert alpha is not None
            new, note = _rescale_alpha(m, alpha, dtype)
        out[key] = new
        d = new.describe()
        rank = d.get("rank")
        report.modules[key] = ModuleReport(algo=new.algorithm.name, rank=rank if isinstance(rank, int) else None,
                                           note=note)
    for name in f.unknown_tensors:
        report.dropped[name] = "not a tensor of any adapter algorithm Lyco reads"
    if multiplier == 0.0:
        report.warnings.append("multiplier 0: the output adapter has no effect")
    converted = [k for k, m in out.items() if m.algorithm.name == "full" and f.modules[k].algorithm.name != "full"]
    if converted:
        report.warnings.append(f"{len(converted)} DoRA/OFT module(s) became full weight differences that are exact "
                               "only for the given base model")
    unchanged = [k for k, r in report.modules.items() if (r.note or "").startswith("unchanged:")]
    if alpha is not None and unchanged:
        report.warnings.append(f"{len(unchanged)} module(s) left unchanged (no alpha to change; see each note)")
    note = f"rescaled ×{multiplier:g}" if multiplier is not None else f"rescaled to alpha {alpha:g}"
    write_adapter(output, out, source_header=f.header, note=note, shapes=shapes, dtype=dtype, overwrite=overwrite)
    return report


__all__ = ["is_nonlinear", "multiplier_targets", "rescale_adapter"]
