"""`lyco adapter resize`: re-rank every module of an adapter to a LoRA/LoCon by SVD of its exact ΔW.

* Plain LoRA/LoCon/DyLoRA modules (a Tucker core is folded into the down factor first) are resized through
  their factors, :func:`~.lowrank.factored_to_lora`: ΔW is never built, and the result is ΔW's best
  approximation of the new rank (Eckart–Young).
* LoHa, LoKr and Full modules: ΔW is built from the tensors (the layer shape comes from the tensors or the file's
  Lyco metadata) and re-extracted with :func:`~.lowrank.to_lora`.
* Modules whose ΔW depends on the base weight, DoRA (``dora_scale``), (IA)³, OFT/BOFT and GLoRA, need the base:
  ``base`` (key → (W, b), or a :class:`~lyco_core.checkpoint.BaseCheckpoint`) makes their exact ΔW = W' − W
  available, and the LoRA then reproduces that change *for that base*. Without a base they are refused, or
  dropped with ``allow_drop`` (``--drop-unsupported``) and listed in the report.
* Norm modules (1-D changes) are not matrices and are kept as they are. A bias change (Full ``diff_b``, or one
  computed from the base) has no place in a LoRA: it is refused, or dropped with ``allow_drop``.

The new rank is at most the given rank (``conv_rank`` for convs with a kernel larger than 1), and never more
than the module's own rank. Output modules store α = rank (scale 1), ``lora_up = U·diag(σ)``, ``lora_down = Vᵀ``
(kohya's convention); the report gives each module's rank and its relative Frobenius error
‖ΔW_new − ΔW‖ / ‖ΔW‖.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..algorithms.lora import lora_factors
from ..checkpoint.weights import BaseGetter, base_getter
from ..errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError
from ..files import ModuleTensors, read_adapter, write_adapter
from ..formats.metadata import module_shapes
from ..progress import ProgressCallback, progress
from .lowrank import MODES, LowRank, factored_to_lora, to_lora
from .report import ModuleReport, OpReport

#: rank rules for ``dynamic`` (see :func:`~.lowrank.select_rank`); sd-scripts offers the three ``sv_*`` ones
DYNAMIC_MODES = tuple(m for m in MODES if m != "fixed")


# --------------------------------------------------------------------------------------------- shared helpers
def module_shape(m: ModuleTensors, meta_shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The layer's weight shape without the base: from the tensors where they fix it (Full ``diff``, Norm,
    LoRA, Tucker LoHa, and LoKr/LoHa when the metadata agrees on the entry count), else from the metadata.

    LoHa/LoKr factors of a conv are stored flattened ``(…, I·∏k)``, so alone they cannot tell a conv from a
    linear layer; then the metadata decides, and without it the shape is unknown (None).
    """
    t, name = m.tensors, m.algorithm.name
    if name == "full":
        return tuple(t["diff"].shape)
    if name == "norm" and "w_norm" in t:
        return tuple(t["w_norm"].shape)
    implied = m.algorithm.implied_weight_shape(t)
    meta = meta_shapes.get(m.key)
    if name == "lora" and implied is not None:
        return tuple(implied)
    if meta is not None and (implied is None or math.prod(meta) == math.prod(implied)):
        return tuple(meta)
    if implied is not None and (len(implied) > 2 or (name == "loha" and "hada_t1" in t)):
        return tuple(implied)
    return None


def exact_change(
    m: ModuleTensors, shape: tuple[int, ...] | None, get_base: BaseGetter | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW (float32, the layer's weight shape) and Δb (or None) of one module at multiplier 1.

    Base-dependent modules (see :func:`needs_base`), and modules whose shape is unknown, use the base
    (W' − W from the module's exact merge rule); others use the tensors alone. Raises
    :class:`InvalidConfigError` naming the module when it needs a base and none is given.
    """
    if m.needs_base or shape is None:
        if get_base is None:
            why = "its weight change depends on the base weights" if m.needs_base else "its layer shape is unknown"
            raise InvalidConfigError(f"{m.key}: {m.label} module, {why}; pass a base model")
        w, b = get_base(m.key)
        w32, b32 = w.float(), None if b is None else b.float()
        try:
            new_w, new_b = m.merge(w32, b32)
        except (IncompatibleBaseError, ValueError) as e:
            raise IncompatibleBaseError(f"{m.key}: does not fit the base layer {tuple(w.shape)} ({e})") from None
        db = None if new_b is None else new_b - (b32 if b32 is not None else torch.zeros_like(new_b))
        return new_w - w32, db
    return m.change(shape)


def plain_lora_factors(m: ModuleTensors) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]] | None:
    """For a LoRA/LoCon/DyLoRA module without DoRA: ``(up (O, r), down (r, I·∏k), shape)`` in float32 with
    ΔW = up·down (the α/r scale folded into ``up``, a Tucker core folded into ``down``); else None."""
    t = m.tensors
    if m.algorithm.name != "lora" or "dora_scale" in t:
        return None
    shape = m.algorithm.implied_weight_shape(t)
    if shape is None:
        return None
    up, down = lora_factors(t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), m.algorithm.scale(t))
    return up, down, tuple(int(d) for d in shape)


def is_kxk(shape: tuple[int, ...]) -> bool:
    """A conv with some kernel size > 1 (``conv_rank`` applies; 1×1 convs count as linear, as in sd-scripts)."""
    return len(shape) > 2 and any(k > 1 for k in shape[2:])


def float_dtype(m: ModuleTensors) -> torch.dtype:
    """The dtype of the module's floating tensors (float32 when it has none)."""
    return next((v.dtype for v in m.tensors.values() if v.is_floating_point() and v.ndim > 0), torch.float32)


def check_rank(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
        raise InvalidConfigError(f"{name}: must be an integer ≥ 1, got {value}")


# --------------------------------------------------------------------------------------------- resize
@dataclass
class _Plan:
    kind: str  # "factored" | "dense" | "keep"
    shape: tuple[int, ...] | None


def _plan(m: ModuleTensors, meta: Mapping[str, tuple[int, ...]], has_base: bool) -> _Plan | str:
    """How to resize one module, or why it cannot be without a base."""
    if m.algorithm.name == "norm":
        return _Plan("keep", None)
    if plain_lora_factors(m) is not None:
        return _Plan("factored", m.algorithm.implied_weight_shape(m.tensors))
    shape = module_shape(m, meta)
    if has_base:
        return _Plan("dense", shape)
    if m.needs_base:
        return f"{m.label}: its weight change depends on the base weights"
    if shape is None:
        return f"{m.label}: its layer shape is unknown (flattened conv factors and no Lyco metadata)"
    return _Plan("dense", shape)


def resize_adapter(
    path: str | Path,
    output: str | Path,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    param: float | None = None,
    conv_rank: int | None = None,
    dtype: torch.dtype | None = None,
    method: str = "auto",
    base: Any = None,
    allow_drop: bool = False,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> OpReport:
    """Write ``output``: the adapter at ``path`` with every module re-ranked to a LoRA/LoCon by SVD.

    Rank: ``rank`` R (a fixed rank; each module gets min(R, its own rank)), or ``dynamic`` (a rule of
    :func:`~.lowrank.select_rank`: ``sv_ratio``, ``sv_fro``, ``sv_cumulative``, also ``threshold``, ``ratio``,
    ``quantile``) with ``param``, where ``rank`` then caps the result. ``conv_rank`` replaces ``rank`` for convs
    with a kernel larger than 1 (default: ``rank``). ``method``: the SVD of modules whose ΔW is built
    (:func:`~.lowrank.to_lora`). ``base`` (path, key → (W, b) callable or mapping, or a BaseCheckpoint) makes
    base-dependent modules (DoRA, (IA)³, OFT/BOFT, GLoRA) and modules of unknown shape convertible; without it
    they raise :class:`InvalidConfigError` naming the first one, unless ``allow_drop``, which drops them (and
    bias changes LoRA cannot hold) into ``report.dropped``. ``dtype``: of the written tensors (default: each
    module keeps its own). Refuses to replace ``output`` unless ``overwrite``.
    """
    check_rank("--rank", rank)
    check_rank("--conv-rank", conv_rank)
    if dynamic is None:
        if rank is None:
            raise InvalidConfigError("resize: give --rank R or --dynamic MODE --param P")
        if param is not None:
            raise InvalidConfigError("--param: only used with --dynamic")
    else:
        if dynamic not in DYNAMIC_MODES:
            raise InvalidConfigError(f"--dynamic: {dynamic!r} is not one of {', '.join(DYNAMIC_MODES)}")
        if param is None:
            raise InvalidConfigError(f"--dynamic {dynamic}: needs --param P")
    if Path(output).exists() and not overwrite:  # fail before the work; write_adapter checks again
        raise FileExistsLycoError(f"{output} exists; pass overwrite/--force")
    f = read_adapter(path)
    get_base = base_getter(base)
    meta = module_shapes(f.header)
    report = OpReport(operation="resize", output=str(output))
    for name in f.unknown_tensors:
        report.dropped[name] = "tensor not understood by any algorithm"

    plans: dict[str, _Plan] = {}
    for key, m in sorted(f.modules.items()):
        plan = _plan(m, meta, get_base is not None)
        if isinstance(plan, str):
            if not allow_drop:
                raise InvalidConfigError(
                    f"{path}: {key} is {plan}; pass a base model (--base BASE) or drop such modules "
                    "(--drop-unsupported)"
                )
            report.dropped[key] = plan
        else:
            plans[key] = plan

    out: dict[str, ModuleTensors] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    lora = None
    for key in progress(list(plans), len(plans), "resize", "modules", progress_callback):
        m, plan = f.modules[key], plans[key]
        if plan.kind == "keep":
            out[key] = m
            report.modules[key] = ModuleReport(algo=m.algorithm.name, note="norm layer: kept as it is")
            continue
        old_rank = m.algorithm.rank(m.tensors)
        db = None
        if plan.kind == "factored":
            up, down, shape = plain_lora_factors(m)  # type: ignore[misc]
            kw = _rank_args(shape, rank, dynamic, param, conv_rank)
            low: LowRank = factored_to_lora(up, down, shape, **kw)
        else:
            dw, db = exact_change(m, plan.shape, get_base)
            shape = tuple(dw.shape)
            kw = _rank_args(shape, rank, dynamic, param, conv_rank)
            low = to_lora(dw, method=method, **kw)
        if db is not None and bool(db.abs().max() > 0):
            if not allow_drop:
                raise InvalidConfigError(
                    f"{path}: {key} changes the bias, which a LoRA cannot hold; pass --drop-unsupported to drop "
                    "the bias change"
                )
            report.dropped[f"{key}.diff_b"] = "bias change: a LoRA has no bias"
        if lora is None:
            from ..algorithms import get

            lora = get("lora")
        cast = dtype or float_dtype(m)
        out[key] = ModuleTensors(key, lora, {n: v.to(cast) for n, v in low.tensors().items()})
        shapes[key] = shape
        src = m.label + (" (tucker)" if "lora_mid.weight" in m.tensors else "")
        src += f" rank {old_rank}" if old_rank is not None else ""
        report.modules[key] = ModuleReport(
            algo="lora", rank=low.rank, rel_error=low.rel_error, note=f"{src} → lora rank {low.rank}"
        )
    if not out:
        raise InvalidConfigError(f"{path}: no module left to write")
    how = f"rank {rank}" if dynamic is None else f"{dynamic} {param}" + (f" (max rank {rank})" if rank else "")
    if conv_rank is not None:
        how += f", conv rank {conv_rank}"
    write_adapter(
        output, out, source_header=f.header, note=f"resized by lyco: {how}", shapes=shapes, dtype=dtype,
        overwrite=overwrite,
    )
    return report


def _rank_args(
    shape: tuple[int, ...], rank: int | None, dynamic: str | None, param: float | None, conv_rank: int | None
) -> dict[str, Any]:
    """Keyword arguments of :func:`to_lora`/:func:`factored_to_lora` for a module of ΔW shape ``shape``."""
    r = conv_rank if (conv_rank is not None and is_kxk(shape)) else rank
    if dynamic is None:
        return {"rank": r}
    return {"mode": dynamic, "param": param, "max_rank": r}
