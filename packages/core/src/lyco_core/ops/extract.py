"""Extract: a LoRA/LoCon from the difference of two checkpoints (spec lycoris-algorithms §6, sd-scripts'
``extract_lora_from_models``).

For every target layer, ΔW = W_tuned − W_base (read one layer at a time from each model, in any layout that
:func:`~lyco_core.checkpoint.open_base` reads; the two may differ, e.g. an LDM file against a diffusers folder)
is approximated by :func:`~lyco_core.ops.lowrank.to_lora`: randomized SVD at a fixed rank where it is faster at
the same error, full SVD for the rank rules that need the whole spectrum. A layer whose LoRA would hold as many
numbers as ΔW itself is written as an exact ``full`` (``diff``) module instead, as LyCORIS's extractor does.

Target layers are kohya's LoRA/LoCon set: every linear and 1×1 conv inside UNet transformer blocks and the text
encoders' attention and MLP layers; with a conv rank also the resnets', down- and upsamplers' layers (3×3 convs
at the conv rank).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..algorithms import get as get_algorithm
from ..checkpoint import BaseCheckpoint, Target, open_base
from ..errors import FileExistsLycoError, IncompatibleBaseError, InvalidConfigError
from ..files import ModuleTensors, write_adapter
from ..formats.metadata import BaseModelInfo
from ..progress import ProgressCallback, progress
from .lowrank import MODES, to_lora
from .report import ModuleReport, OpReport

_ATTENTION = re.compile(r"(^|\.)attentions\.\d+\.")
_CONV_BLOCKS = re.compile(r"(^|\.)(resnets|downsamplers|upsamplers)\.\d+\.")
_TE = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def is_target(t: Target, with_conv: bool) -> bool:
    """kohya's LoRA/LoCon module set, from a layer's role, diffusers/HF path and weight shape."""
    if len(t.shape) < 2:
        return False
    if t.role == "unet":
        if _ATTENTION.search(t.path):
            return True
        return with_conv and bool(_CONV_BLOCKS.search(t.path))
    return bool(_TE.search(t.path))


def _diff(base: BaseCheckpoint, tuned: BaseCheckpoint, key: str) -> torch.Tensor:
    w0, _ = base.weight(key)
    w1, _ = tuned.weight(key)
    return w1.float() - w0.float()


def extract_adapter(
    base_path: str | Path,
    tuned_path: str | Path,
    output: str | Path,
    *,
    rank: int | None = None,
    mode: str = "fixed",
    param: float | None = None,
    conv_rank: int | None = None,
    tucker: bool = False,
    method: str = "auto",
    min_diff: float = 0.0,
    text_encoder: bool = True,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress_callback: ProgressCallback | None = None,
) -> OpReport:
    """Write a LoRA/LoCon approximating ``tuned − base`` and report each module's rank and relative error.

    ``mode="fixed"`` uses ``rank``; ``threshold`` / ``ratio`` / ``quantile`` (and resize's ``sv_*`` rules) pick
    each module's rank from its singular values with ``param``, capped by ``rank`` when given. ``conv_rank``
    (same rule; ``param`` applies to both) adds the resnet/sampler layers, 3×3 convs at that rank, as a Tucker
    LoCon with ``tucker``. Layers whose max |ΔW| ≤ ``min_diff`` are skipped (listed in ``dropped``).
    ``method``: ``auto`` / ``full`` / ``randomized`` SVD (see :mod:`.lowrank`).
    """
    if mode not in MODES:
        raise InvalidConfigError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "fixed" and rank is None:
        raise InvalidConfigError("extract: give --rank R (or --mode threshold|ratio|quantile with --param P)")
    if mode != "fixed" and param is None:
        raise InvalidConfigError(f"extract: --mode {mode} needs --param")
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsLycoError(f"{out} exists; pass overwrite/--force")
    report = OpReport(operation="extract", output=str(out))
    lora = get_algorithm("lora")
    full = get_algorithm("full")
    modules: dict[str, ModuleTensors] = {}
    with open_base(base_path) as base, open_base(tuned_path) as tuned:
        if base.family != tuned.family:
            report.warnings.append(f"base is {base.family}, tuned model is {tuned.family}")
        with_conv = conv_rank is not None
        keys = [t.key for t in base if is_target(t, with_conv) and (text_encoder or t.role == "unet")]
        if not keys:
            raise IncompatibleBaseError(f"{base_path}: no layers to extract from")
        for key in progress(keys, len(keys), "extract", "layers", progress_callback):
            other = tuned.resolve(key)
            if other is None:
                report.dropped[key] = f"no such layer in {tuned_path}"
                continue
            if tuned.shape(other) != base.shape(key):
                raise IncompatibleBaseError(
                    f"{key}: base layer {list(base.shape(key))} and tuned layer {list(tuned.shape(other))} differ"
                )
            delta = _diff(base, tuned, key)
            if float(delta.abs().max()) <= min_diff:
                report.dropped[key] = f"unchanged (max |ΔW| ≤ {min_diff:g})"
                continue
            is_conv3 = delta.ndim > 2 and any(k > 1 for k in delta.shape[2:])
            r = conv_rank if is_conv3 else rank
            lr = to_lora(
                delta, rank=r, mode=mode, param=param, tucker=tucker and is_conv3, method=method
            )
            lora_numel = sum(t.numel() for t in lr.tensors().values())
            if lora_numel >= delta.numel():
                modules[key] = ModuleTensors(key, full, {"diff": delta.contiguous()})
                report.modules[key] = ModuleReport(algo="full", rel_error=0.0, note="as small as ΔW: stored whole")
                continue
            modules[key] = ModuleTensors(key, lora, lr.tensors())
            report.modules[key] = ModuleReport(algo="lora", rank=lr.rank, rel_error=lr.rel_error, note=lr.method)
        metadata = {"base": BaseModelInfo(family=base.family, model_name=Path(base_path).name).model_dump()}
    write_adapter(
        out,
        modules,
        metadata=metadata,
        note=f"extracted from {Path(tuned_path).name} − {Path(base_path).name}",
        dtype=dtype,
        overwrite=overwrite,
    )
    return report
