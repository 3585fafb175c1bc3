"""`lyco adapter convert`: one adapter file to another ecosystem, naming, algorithm or base model.

What :func:`convert_adapter` does, in order:

1. **Read** a kohya/LyCORIS file (``lora_unet_…``, ``lora_te…``, ``lycoris_…``, ``oft_unet_…``) or a diffusers /
   PEFT-style file (dotted ``unet.``/``text_encoder.``/``base_model.model.`` keys, ``lora_A``/``lora_B``).
2. **Rename** every key to its canonical kohya form (spec ecosystem-formats §1.1): UNet in diffusers names for
   SD 1.x/2.x and LDM names for SDXL (``--naming`` forces one), ``lora_te_`` for SD 1.x/2.x, ``lora_te1_``/
   ``lora_te2_`` for SDXL, ``oft_unet_`` → ``lora_unet_``. The family comes from ``--family``, else the file
   (:func:`~lyco_core.ops.family.adapter_family`), else ``--base``.
3. **Re-target** (``--to-base FAMILY``, spec §5): same family → unchanged; SD 1.x ↔ SD 2.x keeps the modules whose
   shapes fit (UNet self-attention, FF, resnets, samplers; ``proj_in``/``proj_out`` reshaped between conv 1×1 and
   linear) and drops the text encoder and cross-attention K/V; SD 1.x/2.x ↔ SDXL is refused. With ``--base
   TARGET --from-base SOURCE`` each ΔW is projected onto the target weight's dominant singular subspaces
   (LoRA-X style, arXiv 2501.16559) and the kept share of ‖ΔW‖ is reported per module.
4. **Change algorithm**: ``--algo lora --rank R [--conv-rank R]`` re-extracts each module by SVD of its exact ΔW
   (reported error), ``--algo full`` writes the exact ΔW as ``diff``; ``--dora-axis`` re-fits a DoRA magnitude on
   the other axis. ΔW of base-dependent modules (DoRA, (IA)³, OFT/BOFT, GLoRA) needs ``--base``.
5. **Fit the target**: ``kohya`` holds every algorithm; ``comfy`` rewrites what ComfyUI reads differently
   (:func:`_for_comfy`); ``diffusers``/``peft`` go through :mod:`lyco_core.formats.peft`.

Anything lost (a dropped module or tensor, a change the target reads differently) is refused unless
``allow_loss`` (``--allow-loss``); the report's ``dropped`` and ``warnings`` say what was lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import algorithms
from ..algorithms.dora import EPS as DORA_EPS
from ..algorithms.dora import dora_weight, magnitude_on_output, weight_norm
from ..errors import (
    CorruptFileError,
    IncompatibleBaseError,
    InvalidConfigError,
    LycoError,
    NotFoundError,
)
from ..files import ModuleTensors, read_adapter, write_adapter
from ..formats.metadata import module_shapes
from ..layers import LayerInfo
from ..progress import ProgressCallback, progress
from .report import ModuleReport, OpReport
from .resize import module_shape

if TYPE_CHECKING:
    from ..checkpoint import BaseCheckpoint

__all__ = [
    "ALGOS",
    "DORA_AXES",
    "FAMILIES",
    "NAMINGS",
    "TARGETS",
    "bake_oft_constraint",
    "comfy_dora_scale",
    "convert_adapter",
    "project_change",
]

TARGETS = ("kohya", "peft", "diffusers", "comfy")
NAMINGS = ("diffusers", "ldm")
ALGOS = ("lora", "full")
DORA_AXES = ("output", "input")
FAMILIES = ("sd1", "sd2", "sdxl")

#: The UNet naming kohya files use per family (sd-scripts trains SD1/SD2 with diffusers names, SDXL with LDM names).
CANONICAL_NAMING = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "ldm"}

#: Key prefixes / substrings that mark a diffusers- or PEFT-style file (spec §1.5).
_PEFT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "base_model.model.", "transformer.")
_PEFT_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", ".lora_linear_layer.")

#: Tensors that are 4-D ``(…, 1, 1)`` on a conv 1×1 and 2-D on a linear layer (see :func:`_reshape_pointwise`).
_POINTWISE_4D = frozenset(
    {"lora_down.weight", "lora_up.weight", "dora_scale", "lokr_w2", "a1.weight", "a2.weight", "b1.weight",
     "b2.weight", "diff", "rescale"}
)

#: OFT ``alpha`` is a constraint on ‖Q‖_F; LyCORIS's bound is ``alpha·O`` and LyCORIS adds this before dividing.
_OFT_NORM_EPS = 1e-8

_SD12_TE = {
    "sd1": "CLIP ViT-L/14 (768 wide, 12 layers)",
    "sd2": "OpenCLIP ViT-H/14 (1024 wide, 23 layers)",
}
_CROSS_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


# --------------------------------------------------------------------------------------------- working state
@dataclass
class _Item:
    """One module on its way to the output."""

    src_key: str  # key in the input file
    key: str  # key in the output
    module: ModuleTensors
    shape: tuple[int, ...] | None  # the layer's weight shape, when known
    notes: list[str] = field(default_factory=list)
    rel_error: float | None = None

    def replace(self, algo: str, tensors: dict[str, torch.Tensor]) -> None:
        self.module = ModuleTensors(self.key, algorithms.get(algo), tensors)


@dataclass
class _Run:
    """Facts shared by every module of one conversion, and what was lost so far."""

    path: str
    to: str
    family: str
    src_base: BaseCheckpoint | None
    tgt_base: BaseCheckpoint | None
    report: OpReport
    losses: list[str] = field(default_factory=list)

    def drop(self, key: str, why: str) -> None:
        self.report.dropped[key] = why
        self.losses.append(f"{key} dropped ({why})")

    def lose(self, item: _Item, what: str) -> None:
        item.notes.append(f"lost: {what}")
        self.report.warnings.append(f"{item.key}: lost {what}")
        self.losses.append(f"{item.key}: {what}")

    def warn_once(self, text: str) -> None:
        if text not in self.report.warnings:
            self.report.warnings.append(text)


# --------------------------------------------------------------------------------------------- entry point
def convert_adapter(
    path: str | Path,
    output: str | Path,
    *,
    to: str,
    naming: str | None = None,
    algo: str | None = None,
    rank: int | None = None,
    conv_rank: int | None = None,
    dora_axis: str | None = None,
    dtype: torch.dtype | str | None = None,
    to_base: str | None = None,
    base: str | Path | None = None,
    from_base: str | Path | None = None,
    family: str | None = None,
    project_rank: int | None = None,
    allow_loss: bool = False,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> OpReport:
    """Convert the adapter at ``path`` and write it to ``output`` (see the module docstring for the steps).

    ``to``: ``kohya`` | ``peft`` | ``diffusers`` | ``comfy``. ``naming``: force the UNet naming of kohya/comfy
    output (``diffusers`` | ``ldm``). ``algo``: ``lora`` (SVD at ``rank``; ``conv_rank`` for convs with a k×k
    kernel, k > 1) or ``full`` (exact ``diff``). ``dora_axis``: re-fit DoRA magnitudes on ``output``/``input``
    (needs ``base``). ``dtype``: cast floating tensors (``fp32``/``fp16``/``bf16`` or a torch dtype).
    ``to_base``: target family. ``base``: the base the file is for (or, with ``to_base``/``from_base``, the target
    base); ``from_base``: the source base for a LoRA-X projection onto ``base``. ``family``: the file's family when
    its keys/metadata do not tell. ``project_rank``: singular vectors kept per side in the projection (default:
    the smallest count holding 90 % of ‖W_target‖²). ``allow_loss``: write even if something is lost.

    Returns the :class:`OpReport` (per output module: algorithm, rank, relative error when approximated, notes;
    ``dropped``: input key → reason; ``warnings``: what else was lost or differs). Raises a
    :class:`~lyco_core.errors.LycoError` with a one-line message on bad options or a lossy conversion without
    ``allow_loss``; nothing is written then.
    """
    cast = _check_options(to, naming, algo, rank, conv_rank, dora_axis, dtype, to_base, base, from_base, family,
                          project_rank)
    modules, header, unknown = _read_input(path, family)
    report = OpReport(operation="convert", output=str(output))
    src_base = tgt_base = None
    try:
        if base is not None:
            from ..checkpoint import open_base

            tgt_base = open_base(base)
            if from_base is not None:
                src_base = open_base(from_base)
            elif to_base is None:
                src_base = tgt_base
        fam = _source_family(path, modules, header, family, src_base)
        for b in (src_base, tgt_base if to_base is None else None):
            if b is not None and "unknown" not in (b.family, fam) and b.family != fam:
                raise IncompatibleBaseError(
                    f"{path}: the file is for {fam} but the base {b.path} is {b.family}; use --to-base {b.family} "
                    "to re-target it, or --family if the file's family was misread"
                )
        run = _Run(str(path), to, fam, src_base, tgt_base, report)
        for name in unknown:
            run.drop(name, "a tensor no algorithm uses")
        meta_shapes = module_shapes(header)
        items = [_Item(k, k, m, _known_shape(k, m, meta_shapes, src_base)) for k, m in modules.items()]
        items = _rename(items, run, naming)
        out_family = fam
        if to_base is not None:
            items = _retarget(items, run, to_base)
            out_family = to_base
        if from_base is not None:
            items = _project_all(items, run, project_rank, progress_callback)
        done: list[_Item] = []
        for it in progress(items, len(items), "convert", "modules", None if from_base else progress_callback):
            kept = _convert_module(it, run, algo, rank, conv_rank, dora_axis)
            if kept is not None:
                done.append(kept)
        if to in ("diffusers", "peft"):
            _check_peft(done, run)
        if run.losses and not allow_loss:
            more = f" (+{len(run.losses) - 1} more)" if len(run.losses) > 1 else ""
            raise InvalidConfigError(
                f"{path}: converting --to {to} loses {run.losses[0]}{more}; pass --allow-loss to write it anyway "
                "(the report lists everything lost)"
            )
        for it in done:
            report.modules[it.key] = _module_report(it)
        _write(done, run, output, header, out_family, cast, overwrite)
    finally:
        for b in {id(x): x for x in (src_base, tgt_base) if x is not None}.values():
            b.close()
    return report


# --------------------------------------------------------------------------------------------- options / input
def _check_options(
    to: str,
    naming: str | None,
    algo: str | None,
    rank: int | None,
    conv_rank: int | None,
    dora_axis: str | None,
    dtype: torch.dtype | str | None,
    to_base: str | None,
    base: Any,
    from_base: Any,
    family: str | None,
    project_rank: int | None,
) -> torch.dtype | None:
    if to not in TARGETS:
        raise InvalidConfigError(f"--to: {to!r} is not one of {', '.join(TARGETS)}")
    if naming is not None and naming not in NAMINGS:
        raise InvalidConfigError(f"--naming: {naming!r} is not one of {', '.join(NAMINGS)}")
    if naming is not None and to in ("diffusers", "peft"):
        raise InvalidConfigError(f"--naming applies to kohya/comfy output; --to {to} always uses diffusers names")
    if algo is not None and algo not in ALGOS:
        raise InvalidConfigError(f"--algo: {algo!r} is not one of {', '.join(ALGOS)}")
    if algo == "lora" and rank is None:
        raise InvalidConfigError("--algo lora needs --rank R (the rank of the re-extracted LoRA)")
    for name, v in (("--rank", rank), ("--conv-rank", conv_rank), ("--project-rank", project_rank)):
        if v is not None and v < 1:
            raise InvalidConfigError(f"{name}: must be ≥ 1, got {v}")
    if conv_rank is not None and algo != "lora":
        raise InvalidConfigError("--conv-rank applies only with --algo lora")
    if dora_axis is not None:
        if dora_axis not in DORA_AXES:
            raise InvalidConfigError(f"--dora-axis: {dora_axis!r} is not one of {', '.join(DORA_AXES)}")
        if algo is not None:
            raise InvalidConfigError("--dora-axis and --algo exclude each other (--algo drops DoRA altogether)")
    for name, fam in (("--to-base", to_base), ("--family", family)):
        if fam is not None and fam not in FAMILIES:
            raise InvalidConfigError(f"{name}: {fam!r} is not one of {', '.join(FAMILIES)}")
    if from_base is not None and base is None:
        raise InvalidConfigError("--from-base SOURCE needs --base TARGET (the base to project the change onto)")
    if project_rank is not None and from_base is None:
        raise InvalidConfigError("--project-rank applies only to a projection (--base TARGET --from-base SOURCE)")
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise InvalidConfigError(f"--dtype: {dtype!r} is not one of {', '.join(names)}")
    return names[dtype]


def _is_peft_style(names: Iterable[str]) -> bool:
    return any(n.startswith(_PEFT_PREFIXES) or any(m in n for m in _PEFT_MARKERS) for n in names)


def _read_input(
    path: str | Path, family: str | None
) -> tuple[dict[str, ModuleTensors], dict[str, str], list[str]]:
    """(modules by kohya key, header metadata, names of tensors nothing understands).

    A directory (PEFT ``save_pretrained`` layout) or a file with dotted diffusers/PEFT keys is read by
    :func:`lyco_core.formats.peft.read_peft_style`; anything else by :func:`lyco_core.files.read_adapter`.
    """
    from ..formats.safetensors_io import read_header

    if Path(path).is_dir() or _is_peft_style(read_header(path).tensors):
        from ..formats.peft import read_peft_style

        modules, header = read_peft_style(path, family=family)
        return dict(modules), dict(header), []
    f = read_adapter(path)
    return f.modules, f.header, list(f.unknown_tensors)


def _source_family(
    path: str | Path,
    modules: dict[str, ModuleTensors],
    header: dict[str, str],
    given: str | None,
    base: BaseCheckpoint | None,
) -> str:
    """``--family``, else what the file says (shapes, keys, metadata), else the base's family, else ``unknown``."""
    if given is not None:
        return given
    from ..files import AdapterFile
    from .family import adapter_family

    verdict = adapter_family(AdapterFile(Path(path), modules, [], header))
    if verdict.family != "unknown":
        return verdict.family
    if base is not None and base.family != "unknown":
        return base.family
    return "unknown"


def _known_shape(
    key: str, m: ModuleTensors, meta_shapes: dict[str, tuple[int, ...]], base: BaseCheckpoint | None
) -> tuple[int, ...] | None:
    """The layer's weight shape: from the base when it has the layer, else :func:`~.resize.module_shape`."""
    if base is not None and base.resolve(key) is not None:
        return tuple(base.shape(key))
    return module_shape(m, meta_shapes)


# --------------------------------------------------------------------------------------------- key renaming
def _rename(items: list[_Item], run: _Run, naming: str | None) -> list[_Item]:
    """Every key in its canonical kohya form (module docstring, step 2); refuses two inputs on one output key."""
    from ..formats.key_paths import format_key, parse_key, with_naming

    fam = run.family
    want = naming or CANONICAL_NAMING.get(fam)
    seen: dict[str, str] = {}
    for it in items:
        kp = parse_key(it.src_key)
        role: str = kp.role
        if kp.is_unet:
            role = "unet"
            if want is not None and want != kp.naming:
                if fam not in CANONICAL_NAMING:
                    raise InvalidConfigError(
                        f"{run.path}: renaming UNet keys to {want} names needs the base family; pass --family "
                        "sd1|sd2|sdxl or --base BASE"
                    )
                kp = with_naming(kp, want, fam)  # type: ignore[arg-type]
        elif role == "lycoris" or (role == "te1" and fam in ("sd1", "sd2")):
            role = "te1" if fam == "sdxl" else "te"
        elif role == "te" and fam == "sdxl":
            role = "te1"
        new = format_key(role, kp.path)
        if new in seen:
            raise CorruptFileError(f"{run.path}: keys {seen[new]!r} and {it.src_key!r} name the same module {new!r}")
        seen[new] = it.src_key
        if new != it.key:
            it.notes.append(f"renamed from {it.src_key}")
        it.key = new
    return items


# --------------------------------------------------------------------------------------------- base weights
def _base_weight(run: _Run, it: _Item, why: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the item's layer in the source base, in float32; fails naming the module without a base."""
    base = run.src_base
    if base is None:
        flag = "--from-base SOURCE" if run.tgt_base is not None else "--base BASE"
        raise InvalidConfigError(f"{it.src_key}: {why} depends on the base weights; pass {flag}")
    key = base.resolve(it.src_key) or base.resolve(it.key)
    if key is None:
        raise NotFoundError(f"{it.src_key}: no such layer in the base {base.path}")
    w, b = base.weight(key)
    if it.shape is not None and tuple(w.shape) != it.shape and w.numel() == math.prod(it.shape):
        w = w.reshape(it.shape)  # a conv 1×1 source layer for a module re-targeted to a linear one, or back
    return w.float(), None if b is None else b.float()


def _exact_change(run: _Run, it: _Item) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW = W' − W (float32, the layer's weight shape) and Δb (or None) of one module at multiplier 1."""
    m = it.module
    if m.needs_base:
        w, b = _base_weight(run, it, f"the weight change of this {m.label} module")
        new_w, new_b = m.merge(w, b)
        db = None if new_b is None else new_b - (b if b is not None else torch.zeros_like(new_b))
        return new_w - w, db
    if it.shape is None:
        if run.src_base is not None:
            w, b = _base_weight(run, it, "this module")
            it.shape = tuple(w.shape)
            new_w, new_b = m.merge(w, b)
            return new_w - w, None if new_b is None else new_b - (b if b is not None else torch.zeros_like(new_b))
        raise InvalidConfigError(
            f"{it.src_key}: the layer shape of this {m.label} module is unknown (no Lyco metadata); "
            "pass --base BASE"
        )
    return m.change(it.shape)


# --------------------------------------------------------------------------------------------- per module
def _convert_module(
    it: _Item, run: _Run, algo: str | None, rank: int | None, conv_rank: int | None, dora_axis: str | None
) -> _Item | None:
    if algo == "lora":
        _to_lora(it, run, rank, conv_rank)
    elif algo == "full":
        _to_full(it, run)
    elif dora_axis is not None:
        _dora_axis(it, run, dora_axis)
    if run.to == "comfy":
        return _for_comfy(it, run)
    return it


def _is_plain_lora(m: ModuleTensors) -> bool:
    return m.algorithm.name == "lora" and "dora_scale" not in m.tensors and "lora_mid.weight" not in m.tensors


def _bias_loss(it: _Item, run: _Run, db: torch.Tensor | None, target: str) -> None:
    if db is not None and bool(db.abs().max() > 0):
        run.lose(it, f"the bias change ({target} has none)")


def _to_lora(it: _Item, run: _Run, rank: int | None, conv_rank: int | None) -> None:
    """Re-extract the module as a LoRA/LoCon by SVD of its exact ΔW (kept as is when it is one of low rank)."""
    from .lowrank import to_lora

    assert rank is not None
    m = it.module
    if it.shape is not None and len(it.shape) == 1:
        it.notes.append("a norm layer's change is not a matrix: kept as it is")
        return
    is_conv_kxk = it.shape is not None and len(it.shape) > 2 and any(k > 1 for k in it.shape[2:])
    r = conv_rank if (is_conv_kxk and conv_rank is not None) else rank
    if _is_plain_lora(m) and int(m.algorithm.rank(m.tensors) or 0) <= r:
        return
    dw, db = _exact_change(run, it)
    if dw.ndim == 1:
        it.notes.append("a norm layer's change is not a matrix: kept as it is")
        return
    low = to_lora(dw, rank=r)
    it.replace("lora", low.tensors())
    it.rel_error = low.rel_error
    it.notes.append(f"{m.label} → lora rank {low.rank} by SVD")
    _bias_loss(it, run, db, "LoRA")


def _to_full(it: _Item, run: _Run) -> None:
    """The exact ΔW (and Δb) as a ``diff`` module."""
    m = it.module
    if m.algorithm.name == "full":
        return
    dw, db = _exact_change(run, it)
    t = {"diff": dw}
    if db is not None and bool(db.abs().max() > 0):
        t["diff_b"] = db
    it.replace("full", t)
    it.notes.append(f"{m.label} → full (exact ΔW)")


def _dora_axis(it: _Item, run: _Run, axis: str) -> None:
    """Re-fit a DoRA module with its magnitude on ``axis``.

    ``W_d = V·m/‖V‖`` normalises along one axis; a magnitude along the other axis cannot give the same W_d with a
    low-rank V in general (each row *and* column scale of W_d would have to match). With the base, the exact
    change ``W_d − W`` is re-extracted by SVD at the module's rank, and the magnitude set to the exact norms of
    ``W_d`` on the new axis; the relative error against the exact change is reported.
    """
    from .lowrank import to_lora

    m = it.module
    if "dora_scale" not in m.tensors:
        return
    on_output = axis == "output"
    if magnitude_on_output(m.tensors["dora_scale"], it.shape) == on_output:
        return
    if run.src_base is None:
        raise InvalidConfigError(
            f"{it.src_key}: a DoRA magnitude cannot move to the {axis} axis exactly (the norm of W+ΔW along the "
            "other axis depends on the base weights); pass --base BASE to re-fit it by SVD, or use --algo full "
            "--base BASE for the exact change"
        )
    w, _ = _base_weight(run, it, "moving the DoRA axis")
    w_d = m.merge(w)[0]
    exact = w_d - w
    low = to_lora(exact, rank=int(m.algorithm.rank(m.tensors) or 1))
    mag = weight_norm(w_d, on_output)
    got = dora_weight(w, low.delta(), mag) - w
    den = float(torch.linalg.vector_norm(exact))
    it.replace("lora", {**low.tensors(), "dora_scale": mag})
    it.rel_error = 0.0 if den == 0 else float(torch.linalg.vector_norm(got - exact)) / den
    it.notes.append(f"DoRA magnitude moved to the {axis} axis (re-fitted by SVD at rank {low.rank})")


# --------------------------------------------------------------------------------------------- ComfyUI
def bake_oft_constraint(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OFT/BOFT tensors with the constraint applied to the blocks and ``alpha`` = 0 (no constraint).

    LyCORIS bounds ‖Q‖_F (Q = B − Bᵀ over all blocks) by ``alpha·O``, ComfyUI by ``alpha`` alone; Q is linear in
    B, so scaling B by ``min(1, alpha·O/(‖Q‖_F + 1e-8))`` gives the constrained rotation with no bound left to
    read, identically in both.
    """
    c = float(t["alpha"].float().item()) if "alpha" in t else 0.0
    if c <= 0:
        return t
    blocks = t["oft_blocks"]
    out_features = int(blocks.shape[-3]) * int(blocks.shape[-1])
    b32 = blocks.float() if blocks.dtype != torch.float64 else blocks
    q_norm = float(torch.linalg.vector_norm(b32 - b32.transpose(-1, -2)))
    factor = min(1.0, c * out_features / (q_norm + _OFT_NORM_EPS))
    return {**t, "oft_blocks": (b32 * factor).to(blocks.dtype), "alpha": torch.zeros((), dtype=t["alpha"].dtype)}


def comfy_dora_scale(m: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The output-axis ``dora_scale`` that makes ComfyUI give ``(W+ΔW)·m/(‖W+ΔW‖+ε)``.

    ComfyUI (comfy/weight_adapter/base.py ``weight_decompose``) divides by ``‖W‖ + ε`` of the *unpatched* W
    on the output axis; ``m·(‖W‖+ε)/(‖W+ΔW‖+ε)`` cancels that. ``weight``/``delta``: ``(O, I, *k)``; returns
    ``m``'s shape and dtype.
    """
    w = weight.float()
    scale = (weight_norm(w, True) + DORA_EPS) / (weight_norm(w + delta.float(), True) + DORA_EPS)
    return (m.float().reshape(scale.shape) * scale).reshape(m.shape).to(m.dtype)


def _for_comfy(it: _Item, run: _Run) -> _Item | None:
    """Make the module give our weight change in ComfyUI (spec ecosystem-formats §2.2/§2.3, ComfyUI rows).

    * LoRA/LoCon (± Tucker), LoHa, LoKr, GLoRA, Full, Norm, DyLoRA, input-axis DoRA: read as we do; kept.
    * (IA)³: ComfyUI loads no (IA)³ keys → the exact ΔW as ``diff`` with a base, else dropped (a loss).
    * Diag-OFT/BOFT: the constraint is baked into the blocks (:func:`bake_oft_constraint`, lossless). Diag-OFT
      ``rescale`` is loaded but not applied by ComfyUI → ``diff`` with a base, else dropped from the module (loss).
    * Output-axis DoRA: ComfyUI normalises by the unpatched ‖W‖ → ``dora_scale`` rescaled with a base
      (:func:`comfy_dora_scale`; the file is then exact in ComfyUI only), else kept and reported as a loss.
    """
    m = it.module
    name, t = m.algorithm.name, dict(m.tensors)
    if name == "ia3":
        if run.src_base is None:
            run.drop(it.src_key, "(IA)³: ComfyUI loads no (IA)³ keys; pass --base BASE to write the exact change "
                     "as a diff")
            return None
        _to_full(it, run)
        it.notes.append("ComfyUI loads no (IA)³ keys")
        return it
    if name in ("diag-oft", "boft"):
        run.warn_once("ComfyUI scales an OFT/BOFT change by the strength twice (s² as read); strength 1 is exact")
        if name == "diag-oft" and "rescale" in t:
            if run.src_base is not None:
                _to_full(it, run)
                it.notes.append("ComfyUI does not apply a diag-OFT rescale")
                return it
            run.lose(it, "the rescale (ComfyUI does not apply it; pass --base BASE to write the exact diff)")
            del t["rescale"]
        baked = bake_oft_constraint(t)
        if baked is not t:
            it.notes.append("constraint applied to the blocks (ComfyUI bounds ‖Q‖ by alpha, not alpha·out_dim)")
        it.replace(name, baked)
        return it
    if "dora_scale" in t and magnitude_on_output(t["dora_scale"], it.shape):
        if run.src_base is None:
            run.lose(it, "exactness in ComfyUI (it normalises output-axis DoRA by ‖W‖, not ‖W+ΔW‖; pass --base "
                         "BASE to rescale dora_scale for it)")
            return it
        w, _ = _base_weight(run, it, "rescaling DoRA for ComfyUI")
        plain = {k: v.float() if v.is_floating_point() else v for k, v in t.items() if k != "dora_scale"}
        delta = m.algorithm.delta_weight(plain, LayerInfo.from_weight(tuple(w.shape)), w).reshape(w.shape)
        t["dora_scale"] = comfy_dora_scale(t["dora_scale"], w, delta)
        it.replace(name, t)
        it.notes.append("dora_scale rescaled for ComfyUI's ‖W‖ normalisation (exact in ComfyUI only)")
        run.warn_once("output-axis DoRA modules were rescaled for ComfyUI: this file gives other tools a different "
                      "weight")
    return it


# --------------------------------------------------------------------------------------------- diffusers / PEFT
def _peft_expressible(it: _Item) -> bool:
    """LoRA/LoCon without a Tucker core, DoRA only on the output axis (spec §1.5, §2.2: PEFT's forms)."""
    t = it.module.tensors
    if it.module.algorithm.name != "lora" or "lora_mid.weight" in t:
        return False
    return "dora_scale" not in t or magnitude_on_output(t["dora_scale"], it.shape)


def _check_peft(items: list[_Item], run: _Run) -> None:
    """Fail with what to do when a module has no diffusers/PEFT form."""
    bad = [it for it in items if not _peft_expressible(it)]
    if bad:
        kinds = sorted({it.module.label + (" (Tucker)" if "lora_mid.weight" in it.module.tensors else "")
                        + (" (input axis)" if "dora_scale" in it.module.tensors else "") for it in bad})
        needs_base = any(it.module.needs_base for it in bad)
        raise InvalidConfigError(
            f"{run.path}: --to {run.to} holds only LoRA/LoCon (DoRA on the output axis), and {len(bad)} module(s) are "
            f"{', '.join(kinds)} (first: {bad[0].key}); add --algo lora --rank R" + (" --base BASE" if needs_base
                                                                                       else "")
        )


# --------------------------------------------------------------------------------------------- other base models
def _reshape_pointwise(m: ModuleTensors, to_conv: bool) -> dict[str, torch.Tensor]:
    """The tensors of a module moved between a linear layer and a conv 1×1 of the same (O, I).

    Factor/diff/magnitude tensors gain or lose trailing ``(1, 1)`` dims; an (IA)³ vector becomes ``(1, C, 1, 1)``
    or ``(C,)``; LoHa/LoKr-w1 matrices (stored flattened either way) and scalars stay.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in m.tensors.items():
        if m.algorithm.name == "ia3" and name == "weight":
            t = t.reshape(1, -1, 1, 1) if to_conv else t.reshape(-1)
        elif name in _POINTWISE_4D and t.ndim >= 2:
            if to_conv and t.ndim == 2:
                t = t.reshape(*t.shape, 1, 1)
            elif not to_conv and t.ndim == 4 and tuple(t.shape[2:]) == (1, 1):
                t = t.reshape(t.shape[:2])
        out[name] = t
    return out


def _sd12_drop_reason(it: _Item, src: str, dst: str) -> str | None:
    k = it.key
    if k.startswith("lora_te"):
        return f"text encoder: {src} uses {_SD12_TE[src]}, {dst} {_SD12_TE[dst]}; no counterpart"
    if k.endswith(("_attn2_to_k", "_attn2_to_v")):
        return (f"cross-attention K/V read the text encoder's states: in-dim {_CROSS_WIDTH[src]} ({src}) vs "
                f"{_CROSS_WIDTH[dst]} ({dst})")
    return None


def _retarget(items: list[_Item], run: _Run, to_base: str) -> list[_Item]:
    """``--to-base``: carry over, keep the shape-compatible subset (SD1 ↔ SD2), or refuse (SD1/SD2 ↔ SDXL)."""
    src = run.family
    if src == "unknown":
        raise InvalidConfigError(f"{run.path}: the file's base family is unknown; pass --family sd1|sd2|sdxl")
    if src == to_base:
        run.report.warnings.append(
            f"--to-base {to_base}: the file is already for {src}; keys and shapes carry over unchanged (its effect "
            "drifts with how far the target's weights moved from the original's)"
        )
        return _check_target_shapes(items, run)
    if "sdxl" in (src, to_base):
        raise IncompatibleBaseError(
            f"{run.path}: {src} → {to_base} has no shape-consistent mapping (different level count, widths per "
            "level, transformer depths, cross-attention width "
            f"{_CROSS_WIDTH[src]} vs {_CROSS_WIDTH[to_base]} and text encoders); retrain on the target instead"
        )
    to_conv = to_base == "sd1"  # SD1 proj_in/proj_out are conv 1×1, SD2's are linear
    kept: list[_Item] = []
    for it in items:
        why = _sd12_drop_reason(it, src, to_base)
        if why is not None:
            run.drop(it.src_key, why)
            continue
        if it.key.endswith(("_proj_in", "_proj_out")) and it.key.startswith("lora_unet"):
            it.replace(it.module.algorithm.name, _reshape_pointwise(it.module, to_conv))
            if it.shape is not None:
                it.shape = (*it.shape[:2], 1, 1) if to_conv else tuple(it.shape[:2])
            it.notes.append("reshaped conv 1×1 → linear" if not to_conv else "reshaped linear → conv 1×1")
        kept.append(it)
    return _check_target_shapes(kept, run)


def _check_target_shapes(items: list[_Item], run: _Run) -> list[_Item]:
    """With a target base, drop the modules it has no layer for, or a layer of another shape."""
    tgt = run.tgt_base
    if tgt is None:
        return items
    kept = []
    for it in items:
        key = tgt.resolve(it.key)
        if key is None:
            run.drop(it.src_key, f"the target base {tgt.path} has no layer {it.key}")
            continue
        shape = tuple(tgt.shape(key))
        if it.shape is not None and shape != it.shape:
            run.drop(it.src_key, f"shape {it.shape} does not fit the target layer's {shape}")
            continue
        kept.append(it)
    return kept


# --------------------------------------------------------------------------------------------- LoRA-X projection
def _energy_rank(s: torch.Tensor, share: float = 0.9) -> int:
    """The fewest leading singular values holding ``share`` of Σσ²."""
    e = torch.cumsum(s.double() ** 2, 0)
    return int(torch.searchsorted(e, share * e[-1]).item()) + 1


def project_change(delta: torch.Tensor, target: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, float]:
    """LoRA-X transfer of one ΔW onto a target weight: ``U_k U_kᵀ · ΔW · V_k V_kᵀ``.

    ``U_k``/``V_k``: the leading ``k`` left/right singular vectors of the target weight (flattened to
    ``(O, I·∏k)``); ``k`` defaults to the fewest holding 90 % of ‖W_target‖²_F. Returns the projected ΔW (same
    shape) and the share ``‖ΔW'‖_F / ‖ΔW‖_F`` that carried over.
    """
    shape = delta.shape
    d = delta.float().reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(target.float().reshape(shape[0], -1), full_matrices=False)
    k = min(k or _energy_rank(s), s.numel())
    uk, vk = u[:, :k], vh[:k].T
    p = uk @ (uk.T @ d @ vk) @ vk.T
    den = float(torch.linalg.vector_norm(d))
    return p.reshape(shape), 0.0 if den == 0 else float(torch.linalg.vector_norm(p)) / den


def _project_all(
    items: list[_Item], run: _Run, k: int | None, callback: ProgressCallback | None
) -> list[_Item]:
    """Each module's exact ΔW (on the source base) projected onto the target base's subspaces, as LoRA at the
    rank of the projection (≤ the module's own rank for LoRA input, since projection cannot raise it)."""
    from .lowrank import to_lora

    tgt = run.tgt_base
    assert tgt is not None
    kept = []
    for it in progress(items, len(items), "project", "modules", callback):
        key = tgt.resolve(it.key)
        if key is None:
            run.drop(it.src_key, f"the target base {tgt.path} has no layer {it.key}")
            continue
        dw, db = _exact_change(run, it)
        w_t, _ = tgt.weight(key)
        if dw.ndim < 2 or tuple(w_t.shape) != tuple(dw.shape):
            run.drop(it.src_key, f"change of shape {tuple(dw.shape)} cannot be projected onto the target layer's "
                                 f"{tuple(w_t.shape)}")
            continue
        p, kept_share = project_change(dw, w_t, k)
        r = int(torch.linalg.matrix_rank(p.reshape(p.shape[0], -1)).item()) or 1
        low = to_lora(p, rank=r)
        it.replace("lora", low.tensors())
        it.rel_error = low.rel_error
        it.notes.append(f"projected onto the target's subspaces: {kept_share:.1%} of ‖ΔW‖ carried over")
        run.report.warnings.append(f"{it.key}: projection kept {kept_share:.1%} of ‖ΔW‖")
        _bias_loss(it, run, db, "the projected LoRA")
        kept.append(it)
    return kept


# --------------------------------------------------------------------------------------------- output
def _module_report(it: _Item) -> ModuleReport:
    m = it.module
    try:
        r = m.algorithm.rank(m.tensors)
    except (KeyError, IndexError):
        r = None
    return ModuleReport(algo=m.algorithm.name, rank=r, rel_error=it.rel_error, note="; ".join(it.notes) or None)


def _output_metadata(header: dict[str, str], family: str) -> dict[str, Any]:
    """The input's Lyco metadata (or its family claim) with the output's base family."""
    from ..formats.metadata import read_metadata

    try:
        lyco = read_metadata(header).lyco
    except LycoError:
        lyco = None
    meta: dict[str, Any] = {} if lyco is None else lyco.model_dump(exclude={"created_at", "created_by"})
    base = dict(meta.get("base") or {})
    if base.get("family") != family:
        base = {"family": family}  # the architecture id/prediction type of another family would be wrong
    meta["base"] = base
    return meta


def _write(
    items: list[_Item],
    run: _Run,
    output: str | Path,
    header: dict[str, str],
    family: str,
    dtype: torch.dtype | None,
    overwrite: bool,
) -> None:
    modules = {it.key: it.module for it in items}
    if run.to in ("diffusers", "peft"):
        from ..formats.key_paths import parse_key
        from ..formats.peft import write_peft_style

        if family not in CANONICAL_NAMING:  # the layout only renames LDM UNet keys; without any, any layout does
            if any(parse_key(k).naming == "ldm" for k in modules):
                raise InvalidConfigError(f"{run.path}: LDM-named UNet keys need the base family to become diffusers "
                                         "paths; pass --family sd1|sd2|sdxl")
            family = "sd1"
        write_peft_style(modules, output, style=run.to, family=family, dtype=dtype, overwrite=overwrite)
        return
    shapes = {it.key: it.shape for it in items if it.shape is not None}
    note = f"lyco adapter convert --to {run.to}"
    write_adapter(output, modules, metadata=_output_metadata(header, family), note=note, shapes=shapes, dtype=dtype,
                  overwrite=overwrite)
