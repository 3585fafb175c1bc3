"""Which tensors of a weight file belong to a UNet or a text encoder, and the adapter keys of their layers.

A :class:`Component` is a name prefix inside one :class:`~.sources.TensorSource` plus the naming used below it:

* ``diffusers`` — a diffusers UNet (``down_blocks.1.attentions.0.proj_in``);
* ``ldm`` — an LDM/SGM UNet (``input_blocks.4.1.proj_in``), under ``model.diffusion_model.``;
* ``clip`` — a Hugging Face CLIP text model (``text_model.encoder.layers.0.self_attn.q_proj``, or without
  ``text_model.`` as transformers 5 saves ``CLIPTextModel``);
* ``openclip`` — an OpenCLIP text tower in an LDM checkpoint (``transformer.resblocks.0.attn.in_proj_weight``):
  q/k/v are row slices of one fused tensor (spec ecosystem-formats §1.3).

:func:`component_targets` lists a component's layers as :class:`Target`\\ s with every kohya/LyCORIS key a file
may use for them (canonical first), using the one key rule of :mod:`lyco_core.formats.naming`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import UnknownFormatError
from ..formats.naming import PREFIX_ALIASES, ROLE_PREFIX, module_key
from ..formats.unet_naming import UNetLayout, diffusers_to_ldm, ldm_to_diffusers
from .sources import TensorSource

Naming = Literal["diffusers", "ldm", "clip", "openclip"]

#: LDM single-file prefixes → (role, naming). SDXL's second text encoder is ``te2``.
LDM_PREFIXES: tuple[tuple[str, str, Naming], ...] = (
    ("model.diffusion_model.", "unet", "ldm"),
    ("cond_stage_model.transformer.", "te", "clip"),
    ("cond_stage_model.model.", "te", "openclip"),
    ("conditioner.embedders.0.transformer.", "te1", "clip"),
    ("conditioner.embedders.1.model.", "te2", "openclip"),
)


@dataclass(frozen=True)
class Component:
    """A UNet or text encoder inside one weight file."""

    role: str
    source: int
    prefix: str
    naming: Naming
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One adaptable layer of the base: where its weight (and bias) lives and the keys that name it.

    ``rows`` is a ``(start, stop)`` slice of the weight's (and bias's) first dimension when the layer is part of a
    fused tensor (OpenCLIP q/k/v); ``shape`` is the layer's own weight shape (after slicing).
    """

    key: str
    role: str
    path: str
    source: int
    weight: str
    bias: str | None
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    aliases: tuple[str, ...] = ()


def detect_components(source: TensorSource, index: int, role: str | None, config: Mapping[str, Any]) -> list[Component]:
    """The components of one weight file. ``role`` is the folder's role when the file is part of a diffusers folder."""
    names = source.names
    found = [
        Component(r, index, prefix, naming)
        for prefix, r, naming in LDM_PREFIXES
        if any(n.startswith(prefix) for n in names)
    ]
    if found:
        if any(c.role == "te2" for c in found):
            found = [Component("te1", c.source, c.prefix, c.naming) if c.role == "te" else c for c in found]
        return found
    if role is None:
        if any(n.startswith(("down_blocks.", "conv_in.", "mid_block.")) for n in names):
            role = "unet"
        elif any(n.startswith(("text_model.", "encoder.layers.")) for n in names):
            role = "te"
        else:
            return []
    naming: Naming = "diffusers" if role == "unet" else "clip"
    return [Component(role, index, "", naming, config)]


# --------------------------------------------------------------------------------------------- UNet layout
def _indices(paths: Iterable[str], pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for p in paths if (m := rx.match(p))}


def infer_layout(paths: list[str], naming: Naming, config: Mapping[str, Any]) -> UNetLayout:
    """The :class:`UNetLayout` of a UNet from its config, else from its tensor names alone."""
    if config.get("down_block_types"):
        return UNetLayout.from_config(config)
    if naming == "diffusers":
        levels = max(_indices(paths, r"down_blocks\.(\d+)\."), default=-1) + 1
        lpb = max(_indices(paths, r"down_blocks\.0\.resnets\.(\d+)\."), default=-1) + 1
        if levels < 1 or lpb < 1:
            raise UnknownFormatError("UNet: cannot tell its block structure from its tensor names")
        down = tuple(any(p.startswith(f"down_blocks.{i}.attentions.") for p in paths) for i in range(levels))
        up = tuple(any(p.startswith(f"up_blocks.{i}.attentions.") for p in paths) for i in range(levels))
        mid = any(p.startswith("mid_block.attentions.") for p in paths)
        return UNetLayout(lpb, down, up, mid)
    n_out = max(_indices(paths, r"output_blocks\.(\d+)\."), default=-1) + 1
    ops = sorted(_indices(paths, r"input_blocks\.(\d+)\.0\.op\."))
    step = ops[0] if ops else n_out  # (L+1): the first downsampler sits at input index L+1
    if n_out < 1 or step < 2 or n_out % step:
        raise UnknownFormatError("UNet: cannot tell its block structure from its LDM tensor names")
    levels = n_out // step

    def attn(block: str, idx: int) -> bool:
        head = f"{block}.{idx}.1."
        return any(p.startswith(head) and (".proj_in" in p or ".transformer_blocks." in p) for p in paths)

    down = tuple(attn("input_blocks", step * i + 1) for i in range(levels))
    up = tuple(attn("output_blocks", step * i) for i in range(levels))
    mid = attn("middle_block", 0) or any(p.startswith("middle_block.1.proj_in") for p in paths)
    return UNetLayout(step - 1, down, up, mid)


# --------------------------------------------------------------------------------------------- keys
def _prefixes(role: str) -> tuple[str, ...]:
    prefix = ROLE_PREFIX[role]
    return (prefix, *PREFIX_ALIASES.get(prefix, ()))


def _unet_keys(diffusers_path: str, ldm_path: str | None, family: str) -> tuple[str, ...]:
    diff_key = module_key(ROLE_PREFIX["unet"], diffusers_path)
    ldm_key = module_key(ROLE_PREFIX["unet"], ldm_path) if ldm_path is not None else None
    generic = module_key(ROLE_PREFIX["lycoris"], diffusers_path)
    ordered = (ldm_key, diff_key) if family == "sdxl" else (diff_key, ldm_key)
    return tuple(dict.fromkeys(k for k in (*ordered, generic) if k is not None))


def _te_keys(role: str, hf_path: str) -> tuple[str, ...]:
    return tuple(module_key(pre, hf_path) for pre in _prefixes(role))


_OPENCLIP_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj|ln_1|ln_2)$")
_OPENCLIP_TO_HF = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}


def component_targets(comp: Component, source: TensorSource, family: str) -> list[Target]:
    """Every layer with a ``.weight`` in ``comp``, keyed as kohya/LyCORIS files name it."""
    names = [n for n in source.names if n.startswith(comp.prefix)]
    present = set(names)
    local = [n[len(comp.prefix) :] for n in names]
    out: list[Target] = []

    def add(path: str, keys: tuple[str, ...], weight: str, rows: tuple[int, int] | None = None) -> None:
        bias = weight[: -len("weight")] + "bias" if weight.endswith("weight") else None
        shape = source.shape(weight)
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        out.append(
            Target(keys[0], comp.role, path, comp.source, weight, bias if bias in present else None, shape, rows, keys)
        )

    if comp.naming in ("diffusers", "ldm"):
        layout = infer_layout(local, comp.naming, comp.config)
        for name in local:
            if not name.endswith(".weight"):
                continue
            path = name[: -len(".weight")]
            try:
                if comp.naming == "diffusers":
                    diff, ldm = path, _try(diffusers_to_ldm, path, layout)
                else:
                    diff, ldm = ldm_to_diffusers(path, layout), path
            except UnknownFormatError:
                continue  # a weight with no module counterpart on the other side is no adapter target
            add(diff, _unet_keys(diff, ldm, family), comp.prefix + name)
    elif comp.naming == "clip":
        for name in local:
            if name.endswith(".weight"):
                path = name[: -len(".weight")]
                hf = path if path.startswith("text_model.") else f"text_model.{path}"
                add(hf, _te_keys(comp.role, hf), comp.prefix + name)
    else:
        for name in local:
            if name.endswith(".attn.in_proj_weight"):
                layer = name[len("transformer.resblocks.") : -len(".attn.in_proj_weight")]
                d = source.shape(comp.prefix + name)[0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    hf = f"text_model.encoder.layers.{layer}.self_attn.{proj}"
                    tgt_rows = (i * d, (i + 1) * d)
                    w = comp.prefix + name
                    b = w[: -len("in_proj_weight")] + "in_proj_bias"
                    keys = _te_keys(comp.role, hf)
                    shape = (d, *source.shape(w)[1:])
                    out.append(Target(keys[0], comp.role, hf, comp.source, w, b if b in present else None, shape,
                                      tgt_rows, keys))
            elif name.endswith(".weight") and (m := _OPENCLIP_LAYER.match(name[: -len(".weight")])):
                hf = f"text_model.encoder.layers.{m.group(1)}.{_OPENCLIP_TO_HF[m.group(2)]}"
                add(hf, _te_keys(comp.role, hf), comp.prefix + name)
            elif name == "ln_final.weight":
                add("text_model.final_layer_norm", _te_keys(comp.role, "text_model.final_layer_norm"),
                    comp.prefix + name)
    return out


def _try(fn: Any, path: str, layout: UNetLayout) -> str | None:
    try:
        return str(fn(path, layout))
    except UnknownFormatError:
        return None
