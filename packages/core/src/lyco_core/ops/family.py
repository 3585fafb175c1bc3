"""Which Stable Diffusion family (SD 1.x, SD 2.x, SDXL) an adapter file fits, and why.

The verdict is read from the file alone (spec ecosystem-formats §5), from three kinds of evidence, strongest first:

1. **Shapes.** The cross-attention width, i.e. the input dimension of any ``attn2_to_k``/``attn2_to_v`` module:
   768 → sd1, 1024 → sd2, 2048 → sdxl (768 + 1280 concatenated). Then the text-encoder width (in-dim of CLIP
   attention/MLP modules): 768 → CLIP ViT-L (sd1, or SDXL's first encoder), 1024 → OpenCLIP ViT-H (sd2),
   1280 → OpenCLIP bigG (SDXL's second encoder).
2. **Key naming and structure.** ``lora_te2_`` (a second text encoder) and ``transformer_blocks_1…`` (SD1/SD2
   have one transformer block per attention) mean SDXL; LDM UNet names (``input_blocks``/``middle_block``/
   ``output_blocks``) are what sd-scripts writes for SDXL, unless the keys show a four-level UNet with attention
   at the first level (SD1/SD2 in LDM naming); in diffusers naming ``down_blocks_0_attentions`` or a fourth level
   means SD1/SD2 and ``up_blocks_0_attentions`` SDXL; ``proj_in`` as a 4-D conv means SD1, as a linear SD2/SDXL;
   more than 12 ``lora_te_`` encoder layers means SD2 (kohya uses 23 of OpenCLIP ViT-H's 24).
3. **Metadata.** Lyco's ``base.family``, then ``ss_base_model_version`` / ``modelspec.architecture`` /
   ``ss_v2`` (:func:`~lyco_core.formats.metadata.family_from_header`).

Each piece of evidence narrows a set of candidate families; one that contradicts what stronger evidence already
established is recorded in ``conflicts`` and ignored. Widths that match no family (tiny test models, other
architectures) are reported but decide nothing. The family is ``unknown`` unless exactly one candidate is left.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import BaseModel, Field

from ..files import AdapterFile, ModuleTensors
from ..formats.metadata import Family, family_from_header, read_metadata

FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl")

#: cross-attention width (in-dim of attn2 to_k/to_v) → family
CROSS_ATTENTION_WIDTH: dict[int, Family] = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
#: CLIP text-encoder hidden width → the families using an encoder of that width, and the encoder's name
TEXT_ENCODER_WIDTH: dict[int, tuple[frozenset[str], str]] = {
    768: (frozenset({"sd1", "sdxl"}), "CLIP ViT-L (SD1, or SDXL's first text encoder)"),
    1024: (frozenset({"sd2"}), "OpenCLIP ViT-H (SD2)"),
    1280: (frozenset({"sdxl"}), "OpenCLIP bigG (SDXL's second text encoder)"),
}

_ATTN2_KV = re.compile(r"attn2_to_[kv]$")
_TE_WIDTH_MODULE = re.compile(r"(self_attn_(q|k|v|out)_proj|mlp_fc1)$")
_TE_LAYER = re.compile(r"^lora_te_(?:text_model_)?encoder_layers_(\d+)_")
_EXTRA_TRANSFORMER_BLOCK = re.compile(r"^lora_unet_.*_transformer_blocks_([1-9]\d*)_")
_LDM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_LDM_FIRST_LEVEL_ATTENTION = re.compile(r"^lora_unet_input_blocks_[12]_1_")
_LDM_FOURTH_LEVEL = re.compile(r"^lora_unet_(input|output)_blocks_(9|10|11)_")
_DIFFUSERS_SD12 = re.compile(r"^lora_unet_(down_blocks_0_attentions|down_blocks_3|up_blocks_3)_")
_DIFFUSERS_SDXL = re.compile(r"^lora_unet_up_blocks_0_attentions_")
_PROJ_IN = re.compile(r"^lora_unet_.*_proj_in$")


class FamilyVerdict(BaseModel):
    """The family an adapter file fits, the evidence read (strongest first), and what disagreed."""

    family: Family = Field(description="sd1 | sd2 | sdxl, or unknown when the evidence does not settle it")
    candidates: list[str] = Field(description="families still possible after all evidence (all three: no evidence)")
    evidence: list[str] = Field(default_factory=list, description="one line per fact read, strongest first")
    conflicts: list[str] = Field(default_factory=list, description="facts that contradict stronger evidence")


@dataclass(frozen=True)
class _Claim:
    families: frozenset[str]
    text: str


def _names(fams: Iterable[str]) -> str:
    return " or ".join(f for f in FAMILIES if f in set(fams))


def module_in_dim(m: ModuleTensors) -> int | None:
    """The input dimension of the layer a module adapts, when its tensors show it (None otherwise).

    LoRA/LoCon/DyLoRA: ``lora_down.weight.shape[1]``; Full: ``diff.shape[1]``; GLoRA: ``a1.shape[0]``; input-side
    (IA)³: the vector length; other algorithms: the second entry of :meth:`Algorithm.implied_weight_shape` (for a
    flattened conv factor that is ``I·∏k``, exact for the linear layers this is used on). OFT/BOFT rotate outputs:
    None.
    """
    t = m.tensors
    if "lora_down.weight" in t and t["lora_down.weight"].ndim >= 2:
        return int(t["lora_down.weight"].shape[1])
    if "diff" in t and t["diff"].ndim >= 2:
        return int(t["diff"].shape[1])
    if "a1.weight" in t:  # GLoRA: a1 is (I, r[, 1…])
        return int(t["a1.weight"].shape[0])
    if m.algorithm.name == "ia3" and m.describe().get("on_input"):
        return int(t["weight"].numel())
    shape = m.algorithm.implied_weight_shape(t)
    return int(shape[1]) if shape is not None and len(shape) >= 2 else None


def module_weight_ndim(m: ModuleTensors) -> int | None:
    """ndim of the adapted layer's weight (2: linear, 4: 2-D conv) when a tensor carries it, else None.

    Flattened factors (LoHa ``hada_w1_b``, LoKr ``lokr_w2_b``) do not tell a linear from a 1×1 conv.
    """
    t = m.tensors
    for name in ("lora_down.weight", "diff", "lokr_w2", "b2.weight", "dora_scale", "rescale"):
        if name in t and t[name].ndim >= 2:
            return int(t[name].ndim)
    return None


def _width_claims(modules: dict[str, ModuleTensors]) -> tuple[list[_Claim], list[str]]:
    """Claims from the cross-attention width, then the text-encoder width; plus notes for unmatched widths."""
    claims: list[_Claim] = []
    notes: list[str] = []
    kv = Counter(d for k, m in modules.items() if _ATTN2_KV.search(k) and (d := module_in_dim(m)) is not None)
    for width, n in kv.most_common():
        what = f"cross-attention width {width} (in-dim of {n} attn2_to_k/attn2_to_v module(s))"
        if width in CROSS_ATTENTION_WIDTH:
            fam = CROSS_ATTENTION_WIDTH[width]
            claims.append(_Claim(frozenset({fam}), f"{what} → {fam}"))
        else:
            notes.append(f"{what} matches no SD family (sd1 768, sd2 1024, sdxl 2048)")
    te = Counter(
        d
        for k, m in modules.items()
        if k.startswith("lora_te") and _TE_WIDTH_MODULE.search(k) and (d := module_in_dim(m)) is not None
    )
    for width, n in te.most_common():
        what = f"text-encoder width {width} (in-dim of {n} CLIP attention/MLP module(s))"
        if width in TEXT_ENCODER_WIDTH:
            fams, name = TEXT_ENCODER_WIDTH[width]
            claims.append(_Claim(fams, f"{what}: {name} → {_names(fams)}"))
        else:
            notes.append(f"{what} matches no SD text encoder (768, 1024, 1280)")
    return claims, notes


def _naming_claims(modules: dict[str, ModuleTensors]) -> tuple[list[_Claim], list[str]]:
    keys = sorted(modules)
    claims: list[_Claim] = []
    notes: list[str] = []

    def first(pattern: re.Pattern[str]) -> str | None:
        return next((k for k in keys if pattern.search(k)), None)

    sdxl, sd12 = frozenset({"sdxl"}), frozenset({"sd1", "sd2"})
    if k := next((k for k in keys if k.startswith("lora_te2_")), None):
        claims.append(_Claim(sdxl, f"second text encoder keys (lora_te2_…, e.g. {k}) → sdxl"))
    elif k := next((k for k in keys if k.startswith("lora_te1_")), None):
        notes.append(f"lora_te1_ keys without lora_te2_ (e.g. {k}): SDXL's prefix, but some tools write it for SD1")
    if k := first(_EXTRA_TRANSFORMER_BLOCK):
        claims.append(_Claim(sdxl, f"more than one transformer block per attention ({k}) → sdxl"))
    if k := first(_LDM_UNET):
        if k2 := first(_LDM_FIRST_LEVEL_ATTENTION) or first(_LDM_FOURTH_LEVEL):
            claims.append(_Claim(sd12, f"LDM UNet names with an SD1/SD2 block layout ({k2}) → sd1 or sd2"))
        else:
            claims.append(_Claim(sdxl, f"LDM UNet names ({k}), which sd-scripts writes for SDXL → sdxl"))
    if k := first(_DIFFUSERS_SD12):
        claims.append(_Claim(sd12, f"diffusers UNet names with an SD1/SD2 block layout ({k}) → sd1 or sd2"))
    if k := first(_DIFFUSERS_SDXL):
        claims.append(_Claim(sdxl, f"diffusers UNet names with attention in up_blocks_0 ({k}) → sdxl"))
    ndims = {k: d for k in keys if _PROJ_IN.search(k) and (d := module_weight_ndim(modules[k])) is not None}
    if ndims:
        k, d = next(iter(ndims.items()))
        if d == 4:
            claims.append(_Claim(frozenset({"sd1"}), f"proj_in is a 1×1 conv ({k}, 4-D tensors) → sd1"))
        else:
            claims.append(_Claim(frozenset({"sd2", "sdxl"}), f"proj_in is a linear layer ({k}) → sd2 or sdxl"))
    layers = [int(m[1]) for k in keys if (m := _TE_LAYER.search(k))]
    if layers and max(layers) >= 12:
        claims.append(_Claim(frozenset({"sd2"}), f"lora_te_ encoder layers up to {max(layers)} (CLIP ViT-L has 12; "
                                                 "kohya's SD2 encoder 23) → sd2"))
    return claims, notes


def _metadata_claims(header: dict[str, str]) -> tuple[list[_Claim], list[str], list[str]]:
    """Claims from Lyco's ``base.family`` and other tools' keys; notes; disagreements among those keys."""
    claims: list[_Claim] = []
    notes: list[str] = []
    try:
        lyco = read_metadata(header).lyco
    except ValueError as e:  # a broken lyco.metadata is reported by inspect; it must not prevent a verdict
        notes.append(f"Lyco metadata unreadable ({e})")
        lyco = None
    if lyco is not None and lyco.base.family != "unknown":
        claims.append(_Claim(frozenset({lyco.base.family}), f"Lyco metadata base.family={lyco.base.family!r}"))
    family, lines = family_from_header(header)
    facts = [ln for ln in lines if not ln.startswith("conflict:")]
    disagreements = [ln.removeprefix("conflict: ") for ln in lines if ln.startswith("conflict:")]
    if family != "unknown":
        claims.append(_Claim(frozenset({family}), "; ".join(facts)))
    elif facts:
        notes.append("; ".join(facts))
    return claims, notes, disagreements


def adapter_family(file: AdapterFile) -> FamilyVerdict:
    """The base family ``file`` fits, with the evidence (see the module docstring for the rules)."""
    candidates: set[str] = set(FAMILIES)
    evidence: list[str] = []
    conflicts: list[str] = []
    for make in (_width_claims, _naming_claims):
        claims, notes = make(file.modules)
        _narrow(claims, candidates, evidence, conflicts)
        evidence += notes
    claims, notes, disagreements = _metadata_claims(file.header)
    _narrow(claims, candidates, evidence, conflicts)
    evidence += notes
    conflicts += disagreements
    family: Family = "unknown"
    if len(candidates) == 1:
        family = next(f for f in FAMILIES if f in candidates)
    return FamilyVerdict(
        family=family, candidates=[f for f in FAMILIES if f in candidates], evidence=evidence, conflicts=conflicts
    )


def _narrow(claims: list[_Claim], candidates: set[str], evidence: list[str], conflicts: list[str]) -> None:
    """Intersect ``candidates`` with each claim in turn; a claim that would leave none is a conflict."""
    for c in claims:
        evidence.append(c.text)
        if candidates & c.families:
            candidates &= c.families
        else:
            conflicts.append(f"{c.text}, but stronger evidence says {_names(candidates)}")


__all__ = ["FamilyVerdict", "adapter_family", "module_in_dim", "module_weight_ndim"]
