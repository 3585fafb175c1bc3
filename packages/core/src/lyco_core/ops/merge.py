"""`lyco adapter merge`: one adapter whose effect is Σ wᵢ·ΔWᵢ (and Σ wᵢ·Δbᵢ) of several adapters.

ΔWᵢ is adapter i's weight change at strength 1 (W'ᵢ − W, by each algorithm's exact rule). Keys are matched
literally, so the inputs must use the same key naming (``lyco adapter convert`` first when they do not).
This is a true weighted sum, not sd-scripts' ``merge_lora.py``, which adds up and down factors separately
(giving wᵢ·|wᵢ|·ΔWᵢ and cross terms; spec ecosystem-formats §4).

Without ``rank`` the result is exact, module by module:

* **LoRA/LoCon/DyLoRA only** (no DoRA): factors concatenated, ``up = [w₁s₁·up₁ | w₂s₂·up₂ …]``,
  ``down = [down₁; down₂; …]`` (sᵢ = αᵢ/rᵢ), α = Σrᵢ so the scale is 1. When every input has a Tucker core, the
  cores go on a block diagonal (the output stays Tucker); a mix of Tucker and plain folds each core into its down
  factor first.
* **(IA)³ only**, same side: the vectors add (W ⊙ (1 + Σ wᵢvᵢ) is linear in the vector). **Full only**: ``diff``
  and ``diff_b`` add. **Norm only**: ``w_norm``/``b_norm`` add.
* **Anything else** (LoHa + LoHa, LoKr, mixed algorithms, Full + LoRA): the sum is not expressible in the inputs'
  algorithm (Hadamard and Kronecker products are not closed under addition), so the module becomes an exact Full
  ``diff`` (plus ``diff_b`` when any input changes the bias), built from the tensors.
* **A module in only one input** is carried over with wᵢ folded into its factors (as ``rescale --multiplier``).
* **DoRA, OFT/BOFT, GLoRA** (and (IA)³ mixed with others): their ΔW depends on the base weight, so merging them
  needs ``base``; they become exact ``diff`` modules for that base. Without a base they are refused (or dropped
  with ``allow_drop``). DoRA/OFT/BOFT alone at weight 1 are copied unchanged.

With ``rank``: Σ wᵢ·ΔWᵢ is re-extracted by SVD to ``rank`` (``conv_rank`` for convs with a kernel > 1) as a
LoRA/LoCon, with the relative error ‖ΔW_out − Σ wᵢΔWᵢ‖/‖Σ wᵢΔWᵢ‖ reported per module. LoRA-only modules go
through their concatenated factors (:func:`~.lowrank.factored_to_lora`, never dense); others through the dense
sum (:func:`~.lowrank.to_lora`). Norm modules stay summed Norm modules. A bias change cannot be kept in a LoRA:
refused, or dropped with ``allow_drop``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import algorithms
from ..algorithms.base import alpha_tensor
from ..checkpoint.weights import BaseGetter, base_getter
from ..errors import CorruptFileError, FileExistsLycoError, InvalidConfigError
from ..files import AdapterFile, ModuleTensors, read_adapter, write_adapter
from ..formats.metadata import module_shapes
from ..progress import ProgressCallback, progress
from .lowrank import factored_to_lora, to_lora
from .report import ModuleReport, OpReport
from .rescale import is_nonlinear, multiplier_targets
from .resize import (
    check_rank,
    exact_change,
    float_dtype,
    is_kxk,
    module_shape,
    plain_lora_factors,
)

UP, DOWN, MID = "lora_up.weight", "lora_down.weight", "lora_mid.weight"


@dataclass
class _Part:
    """One input's module for a key, with its weight and the file's index."""

    index: int
    weight: float
    module: ModuleTensors
    shape: tuple[int, ...] | None


def _is_plain_lora(m: ModuleTensors) -> bool:
    return m.algorithm.name == "lora" and "dora_scale" not in m.tensors


def _same_side_ia3(parts: list[_Part]) -> bool:
    from ..algorithms.ia3 import ia3_on_input

    if not all(p.module.algorithm.name == "ia3" for p in parts):
        return False
    sides = {ia3_on_input(p.module.tensors) for p in parts}
    shapes = {tuple(p.module.tensors["weight"].shape) for p in parts}
    return len(sides) == 1 and len(shapes) == 1


def _kind(parts: list[_Part], rank: int | None) -> str:
    """How a key's parts combine: see the module docstring. ``base`` kinds need the base weights."""
    names = {p.module.algorithm.name for p in parts}
    if names == {"norm"}:
        return "norm"
    if all(_is_plain_lora(p.module) for p in parts):
        return "lora"
    if rank is None:
        if len(parts) == 1:
            m = parts[0].module
            if not is_nonlinear(m) or parts[0].weight == 1.0:
                return "single"
            return "base"
        if names == {"full"}:
            return "full"
        if _same_side_ia3(parts):
            return "ia3"
    if any(p.module.needs_base for p in parts):
        return "base"
    return "dense"


def _unsupported(parts: list[_Part], kind: str, has_base: bool) -> str | None:
    """Why this key cannot be merged without a base (None when it can)."""
    if has_base:
        return None
    if kind == "base":
        m = next(p.module for p in parts if p.module.needs_base)
        return f"{m.label}: its weight change depends on the base weights"
    if kind == "dense":
        unknown = next((p.module for p in parts if p.shape is None), None)
        if unknown is not None:
            return f"{unknown.label}: its layer shape is unknown (flattened conv factors and no Lyco metadata)"
    return None


def _check_shapes(key: str, parts: list[_Part], paths: Sequence[str | Path]) -> None:
    known = [(p, p.shape) for p in parts if p.shape is not None]
    if not known:
        return
    first, shape = known[0]
    for p, s in known[1:]:
        if s is not None and (s[0] != shape[0] or math.prod(s) != math.prod(shape)):
            raise CorruptFileError(
                f"{key}: {paths[first.index]} has ΔW shape {shape}, {paths[p.index]} has {s}: not the same layer"
            )


# --------------------------------------------------------------------------------------------- exact combiners
def _concat_lora(parts: list[_Part]) -> dict[str, torch.Tensor]:
    """Concatenated factors with each wᵢ·αᵢ/rᵢ folded into ``up``; α = total rank (scale 1)."""
    shape = parts[0].shape
    assert shape is not None
    ones = (1,) * (len(shape) - 2)
    if all(MID in p.module.tensors for p in parts):
        ups, mids, downs = [], [], []
        for p in parts:
            t = p.module.tensors
            s = p.weight * p.module.algorithm.scale(t)
            ups.append(t[UP].float().reshape(shape[0], -1) * s)
            mids.append(t[MID].float())
            downs.append(t[DOWN].float().reshape(t[DOWN].shape[0], -1))
        r_up, r_down = sum(m.shape[0] for m in mids), sum(m.shape[1] for m in mids)
        mid = torch.zeros(r_up, r_down, *mids[0].shape[2:])
        i = j = 0
        for m in mids:  # block diagonal: ΔW = Σ upᵢ·midᵢ·downᵢ exactly
            mid[i : i + m.shape[0], j : j + m.shape[1]] = m
            i, j = i + m.shape[0], j + m.shape[1]
        return {
            UP: torch.cat(ups, 1).reshape(shape[0], r_up, *ones),
            MID: mid,
            DOWN: torch.cat(downs, 0).reshape(r_down, shape[1], *ones),
            "alpha": alpha_tensor(r_down),
        }
    ups, downs = [], []
    for p in parts:
        up, down, _ = plain_lora_factors(p.module)  # type: ignore[misc]
        ups.append(up * p.weight)
        downs.append(down)
    r = sum(d.shape[0] for d in downs)
    return {
        UP: torch.cat(ups, 1).reshape(shape[0], r, *ones),
        DOWN: torch.cat(downs, 0).reshape(r, *shape[1:]),
        "alpha": alpha_tensor(r),
    }


def _sum_tensors(parts: list[_Part], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Σ wᵢ·tᵢ for each name some part has (missing = 0), float32."""
    out: dict[str, torch.Tensor] = {}
    for p in parts:
        for n in names:
            if n in p.module.tensors:
                term = p.weight * p.module.tensors[n].float()
                out[n] = term if n not in out else out[n] + term
    return out


def _scaled_single(p: _Part) -> dict[str, torch.Tensor]:
    """One module with its weight folded into the tensors its effect is linear in (as rescale does)."""
    t = dict(p.module.tensors)
    if p.weight != 1.0:
        for n in multiplier_targets(p.module):
            t[n] = (t[n].float() * p.weight).to(t[n].dtype)
    return t


def _dense_sum(parts: list[_Part], get_base: BaseGetter | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ wᵢ·ΔWᵢ (float32, the layer's weight shape) and Σ wᵢ·Δbᵢ (None when no input has a bias change)."""
    total: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    for p in parts:
        dw, db = exact_change(p.module, p.shape, get_base)
        if total is not None and total.shape != dw.shape:
            dw = dw.reshape(total.shape)
        total = p.weight * dw if total is None else total + p.weight * dw
        if db is not None:
            bias = p.weight * db if bias is None else bias + p.weight * db
    assert total is not None
    return total, bias


# --------------------------------------------------------------------------------------------- entry point
def merge_adapters(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    base: Any = None,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    allow_drop: bool = False,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> OpReport:
    """Write ``output``: one adapter whose effect is Σ wᵢ·ΔWᵢ of the adapters at ``paths``.

    ``weights``: one finite number per path (default 1.0 each). ``rank`` (and ``conv_rank`` for convs with a
    kernel > 1, default ``rank``): re-extract every module as a LoRA of at most that rank and report its error;
    without it the merge is exact (module docstring). ``base`` (path, key → (W, b) callable or mapping, or a
    BaseCheckpoint) is needed for base-dependent modules; without it they raise :class:`InvalidConfigError`
    naming the first one, unless ``allow_drop``, which drops them (and bias changes a LoRA cannot hold) into
    ``report.dropped``. ``method``: the SVD for dense re-extraction. ``dtype``: of the written tensors (default:
    the dtype of each module's first input). Refuses to replace ``output`` unless ``overwrite``.
    """
    if not paths:
        raise InvalidConfigError("merge: give at least one adapter file")
    ws = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(ws) != len(paths):
        raise InvalidConfigError(f"--weights: {len(ws)} weight(s) for {len(paths)} adapter file(s)")
    if not all(math.isfinite(w) for w in ws):
        raise InvalidConfigError(f"--weights: must be finite numbers, got {ws}")
    check_rank("--rank", rank)
    check_rank("--conv-rank", conv_rank)
    if conv_rank is not None and rank is None:
        raise InvalidConfigError("--conv-rank: only used with --rank")
    if Path(output).exists() and not overwrite:  # fail before the work; write_adapter checks again
        raise FileExistsLycoError(f"{output} exists; pass overwrite/--force")
    files: list[AdapterFile] = [read_adapter(p) for p in paths]
    get_base = base_getter(base)
    report = OpReport(operation="merge", output=str(output))
    for path, f in zip(paths, files, strict=True):
        for name in f.unknown_tensors:
            report.dropped[f"{path}: {name}"] = "tensor not understood by any algorithm"

    plan: dict[str, tuple[str, list[_Part]]] = {}
    for key in sorted({k for f in files for k in f.modules}):
        parts = []
        for i, (f, w) in enumerate(zip(files, ws, strict=True)):
            if key in f.modules and w != 0.0:
                m = f.modules[key]
                parts.append(_Part(i, w, m, module_shape(m, module_shapes(f.header))))
        if not parts:
            report.dropped[key] = "weight 0 in every input that has it"
            continue
        _check_shapes(key, parts, paths)
        kind = _kind(parts, rank)
        why = _unsupported(parts, kind, get_base is not None)
        if why is not None:
            if not allow_drop:
                raise InvalidConfigError(
                    f"{key}: {why}; pass a base model (--base BASE) or drop such modules (--drop-unsupported)"
                )
            report.dropped[key] = why
            continue
        plan[key] = (kind, parts)

    out: dict[str, ModuleTensors] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for key in progress(list(plan), len(plan), "merge", "modules", progress_callback):
        kind, parts = plan[key]
        cast = dtype or float_dtype(parts[0].module)
        src = " + ".join(f"{p.weight:g}×{p.module.label}[{p.index}]" for p in parts)
        if rank is None:
            module, shape, note = _exact(key, kind, parts, get_base, allow_drop, report)
            rel_error = None
        else:
            module, shape, note, rel_error = _reranked(key, kind, parts, rank, conv_rank, method, get_base,
                                                       allow_drop, report)
        t = {n: (v.to(cast) if v.is_floating_point() and n != "on_input" else v) for n, v in module.tensors.items()}
        out[key] = ModuleTensors(key, module.algorithm, t)
        if shape is not None:
            shapes[key] = shape
        report.modules[key] = ModuleReport(
            algo=module.algorithm.name, rank=module.algorithm.rank(t), rel_error=rel_error, note=f"{src}: {note}"
        )
    if not out:
        raise InvalidConfigError("merge: no module left to write")
    names = ", ".join(f"{w:g}×{Path(p).name}" for p, w in zip(paths, ws, strict=True))
    how = f"merged by lyco: {names}" + (f", rank {rank}" if rank else "")
    write_adapter(output, out, source_header=files[0].header, note=how, shapes=shapes, dtype=dtype,
                  overwrite=overwrite)
    return report


def _bias_loss(key: str, bias: torch.Tensor | None, allow_drop: bool, report: OpReport) -> None:
    if bias is not None and bool(bias.abs().max() > 0):
        if not allow_drop:
            raise InvalidConfigError(
                f"{key}: the merged module changes the bias, which a LoRA cannot hold; pass --drop-unsupported "
                "to drop the bias change, or merge without --rank"
            )
        report.dropped[f"{key}.diff_b"] = "bias change: a LoRA has no bias"


def _exact(
    key: str, kind: str, parts: list[_Part], get_base: BaseGetter | None, allow_drop: bool, report: OpReport
) -> tuple[ModuleTensors, tuple[int, ...] | None, str]:
    """The exact merged module of one key, its ΔW shape (when known) and a note."""
    shape = parts[0].shape
    if kind == "lora":
        if len(parts) == 1:
            m = ModuleTensors(key, parts[0].module.algorithm, _scaled_single(parts[0]))
            return m, shape, "scaled" if parts[0].weight != 1.0 else "copied"
        t = _concat_lora(parts)
        how = "Tucker cores block-diagonal" if MID in t else "factors concatenated"
        return ModuleTensors(key, algorithms.get("lora"), t), shape, how
    if kind == "single":
        m = parts[0].module
        note = "copied" if parts[0].weight == 1.0 else "scaled"
        return ModuleTensors(key, m.algorithm, _scaled_single(parts[0])), shape, note
    if kind == "norm":
        return ModuleTensors(key, algorithms.get("norm"), _sum_tensors(parts, ("w_norm", "b_norm"))), shape, "summed"
    if kind == "full":
        return ModuleTensors(key, algorithms.get("full"), _sum_tensors(parts, ("diff", "diff_b"))), shape, "summed"
    if kind == "ia3":
        t = _sum_tensors(parts, ("weight",))
        t["on_input"] = parts[0].module.tensors["on_input"]
        return ModuleTensors(key, algorithms.get("ia3"), t), shape, "(IA)³ vectors summed"
    dw, db = _dense_sum(parts, get_base)
    t = {"diff": dw}
    # an input's bias tensor is kept even when the sum is 0; a base-derived zero Δb is not written
    if db is not None and (any("diff_b" in p.module.tensors for p in parts) or bool(db.abs().max() > 0)):
        t["diff_b"] = db
    why = "not closed under sum: exact full diff" if kind == "dense" else "exact full diff for this base"
    return ModuleTensors(key, algorithms.get("full"), t), tuple(dw.shape), why


def _reranked(
    key: str,
    kind: str,
    parts: list[_Part],
    rank: int,
    conv_rank: int | None,
    method: str,
    get_base: BaseGetter | None,
    allow_drop: bool,
    report: OpReport,
) -> tuple[ModuleTensors, tuple[int, ...] | None, str, float | None]:
    """Σ wᵢ·ΔWᵢ re-extracted as a LoRA of at most ``rank`` (``conv_rank`` for k×k convs), with its error."""
    if kind == "norm":
        t = _sum_tensors(parts, ("w_norm", "b_norm"))
        return ModuleTensors(key, algorithms.get("norm"), t), parts[0].shape, "norm layer: summed, not re-ranked", None
    if kind == "lora":
        ups, downs = [], []
        shape: tuple[int, ...] | None = None
        for p in parts:
            up, down, shape = plain_lora_factors(p.module)  # type: ignore[misc]
            ups.append(up * p.weight)
            downs.append(down)
        assert shape is not None
        r = conv_rank if (conv_rank is not None and is_kxk(shape)) else rank
        low = factored_to_lora(torch.cat(ups, 1), torch.cat(downs, 0), shape, rank=r)
        note = f"factors concatenated, SVD to rank {low.rank}"
    else:
        dw, db = _dense_sum(parts, get_base)
        _bias_loss(key, db, allow_drop, report)
        shape = tuple(dw.shape)
        r = conv_rank if (conv_rank is not None and is_kxk(shape)) else rank
        low = to_lora(dw, rank=r, method=method)
        note = f"dense sum, SVD to rank {low.rank}"
    return ModuleTensors(key, algorithms.get("lora"), low.tensors()), shape, note, low.rel_error
