"""UNet module paths: diffusers ↔ LDM (CompVis / SGM) naming for SD1.x, SD2.x and SDXL.

sd-scripts trains SD1/SD2 on a UNet with diffusers names but SDXL on the SGM UNet, so kohya SDXL files name
UNet modules by LDM paths (``input_blocks.4.1.proj_in``) while SD1/SD2 files use diffusers paths
(``down_blocks.1.attentions.0.proj_in``). This module converts either way, for dotted module paths and for
state-dict keys (a trailing ``.weight`` / ``.bias`` passes through unchanged).

The mapping is index arithmetic over a :class:`UNetLayout`. With ``L`` resnets per down block and level ``i``:

* ``conv_in`` ↔ ``input_blocks.0.0``; ``conv_norm_out`` / ``conv_act`` / ``conv_out`` ↔ ``out.0`` / ``.1`` / ``.2``
* ``time_embedding[.linear_1|.act|.linear_2]`` ↔ ``time_embed[.0|.1|.2]``
* ``add_embedding[.linear_1|.act|.linear_2]`` ↔ ``label_emb.0[.0|.1|.2]`` (SDXL)
* ``down_blocks.i.resnets.j.<r>`` ↔ ``input_blocks.{(L+1)i+j+1}.0.<R(r)>``
* ``down_blocks.i.attentions.j.<x>`` ↔ ``input_blocks.{(L+1)i+j+1}.1.<x>``
* ``down_blocks.i.downsamplers.0[.conv]`` ↔ ``input_blocks.{(L+1)(i+1)}.0[.op]``
* ``mid_block.resnets.0`` / ``mid_block.attentions.0`` / ``mid_block.resnets.1`` ↔ ``middle_block.0`` / ``.1`` / ``.2``
* ``up_blocks.i.resnets.j.<r>`` (j ≤ L) ↔ ``output_blocks.{(L+1)i+j}.0.<R(r)>``
* ``up_blocks.i.attentions.j.<x>`` ↔ ``output_blocks.{(L+1)i+j}.1.<x>``
* ``up_blocks.i.upsamplers.0[.conv]`` ↔ ``output_blocks.{(L+1)i+L}.{s}[.conv]``, ``s`` = 2 if up block ``i`` has
  attentions, else 1

``R`` renames the resnet children (:data:`RESNET_RENAMES`); names inside a transformer (attention) block
(:data:`ATTENTION_CHILDREN` and below) are identical on both sides. Paths with no single counterpart on the
other side (containers such as ``down_blocks.0`` or ``input_blocks.1``, the resnet ``nonlinearity`` shared by two
LDM slots, ``time_proj``) raise :class:`~lyco_core.errors.UnknownFormatError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidConfigError, UnknownFormatError

__all__ = ["ATTENTION_CHILDREN", "RESNET_RENAMES", "UNetLayout", "diffusers_to_ldm", "ldm_to_diffusers"]

#: Modules outside the numbered blocks: (diffusers path, LDM path). The root maps to the root.
FIXED_NAMES: tuple[tuple[str, str], ...] = (
    ("", ""),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding", "time_embed"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.act", "time_embed.1"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding", "label_emb.0"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.act", "label_emb.0.1"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_act", "out.1"),
    ("conv_out", "out.2"),
)

#: Children of a resnet block: (diffusers ``ResnetBlock2D`` name, LDM ``ResBlock`` name).
RESNET_RENAMES: tuple[tuple[str, str], ...] = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("dropout", "out_layers.2"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)

_FIXED_TO_LDM = dict(FIXED_NAMES)
_FIXED_TO_DIFFUSERS = {ldm: diff for diff, ldm in FIXED_NAMES}
_RESNET_TO_LDM = dict(RESNET_RENAMES)
_RESNET_TO_DIFFUSERS = {ldm: diff for diff, ldm in RESNET_RENAMES}

#: Children of a transformer (attention) block, the same in diffusers ``Transformer2DModel`` and LDM
#: ``SpatialTransformer``; everything below them passes through unchanged.
ATTENTION_CHILDREN: frozenset[str] = frozenset({"norm", "proj_in", "proj_out", "transformer_blocks"})

_DOWN_TYPES: dict[str | None, bool] = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES: dict[str | None, bool] = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_MID_TYPES: dict[str | None, bool] = {"UNetMidBlock2DCrossAttn": True, None: False}


@dataclass(frozen=True)
class UNetLayout:
    """The block structure that fixes the LDM numbering of a UNet.

    ``layers_per_block`` is ``L`` (resnets per down block; up blocks have ``L+1``). ``down_attentions[i]`` /
    ``up_attentions[i]`` say whether down / up block ``i`` has transformer blocks. ``mid_block`` says whether a
    cross-attention mid block exists. Every level but the last has a downsampler (down) / upsampler (up).
    """

    layers_per_block: int
    down_attentions: tuple[bool, ...]
    up_attentions: tuple[bool, ...]
    mid_block: bool = True

    def __post_init__(self) -> None:
        if self.layers_per_block < 1:
            raise InvalidConfigError(f"UNetLayout: layers_per_block must be ≥ 1, got {self.layers_per_block}")
        if not self.down_attentions or len(self.down_attentions) != len(self.up_attentions):
            raise InvalidConfigError(
                f"UNetLayout: need as many up blocks as down blocks (≥ 1), got {len(self.down_attentions)} down "
                f"and {len(self.up_attentions)} up"
            )

    @property
    def levels(self) -> int:
        """Number of resolution levels (down blocks)."""
        return len(self.down_attentions)

    @classmethod
    def for_family(cls, family: str) -> UNetLayout:
        """The layout of the released base models: ``"sd1"``, ``"sd2"`` or ``"sdxl"``."""
        if family in ("sd1", "sd2"):
            return cls(2, (True, True, True, False), (False, True, True, True))
        if family == "sdxl":
            return cls(2, (False, True, True), (True, True, False))
        raise InvalidConfigError(f"unknown UNet family {family!r}; expected 'sd1', 'sd2' or 'sdxl'")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """Read a diffusers ``UNet2DConditionModel.config`` (``layers_per_block``, ``*_block_types``)."""
        lpb = config.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            values = set(lpb)
            if len(values) != 1:
                raise UnknownFormatError(f"UNet with per-block layers_per_block {list(lpb)} has no LDM naming")
            lpb = values.pop()
        down = tuple(_block_attention(t, _DOWN_TYPES, "down") for t in config["down_block_types"])
        up = tuple(_block_attention(t, _UP_TYPES, "up") for t in config["up_block_types"])
        mid = _block_attention(config.get("mid_block_type", "UNetMidBlock2DCrossAttn"), _MID_TYPES, "mid")
        return cls(int(lpb), down, up, mid)

    # ----- index arithmetic -----------------------------------------------------------------------------------
    def input_index(self, level: int, j: int) -> int:
        """LDM ``input_blocks`` index of down block ``level``'s item ``j`` (``j == L``: its downsampler)."""
        return (self.layers_per_block + 1) * level + j + 1

    def output_index(self, level: int, j: int) -> int:
        """LDM ``output_blocks`` index of up block ``level``'s item ``j`` (``0 ≤ j ≤ L``)."""
        return (self.layers_per_block + 1) * level + j

    def upsampler_slot(self, level: int) -> int:
        """Position of the upsampler inside its ``output_blocks`` entry: after the attention if there is one."""
        return 2 if self.up_attentions[level] else 1


def _block_attention(block_type: str | None, table: Mapping[str | None, bool], side: str) -> bool:
    if block_type not in table:
        known = ", ".join(str(k) for k in table)
        raise UnknownFormatError(f"{side} block type {block_type!r} has no LDM naming (supported: {known})")
    return table[block_type]


# ----- the rules --------------------------------------------------------------------------------------------------
_IDX = r"(?:0|[1-9]\d*)"
_REST = r"(?:\.(?P<rest>.+))?"
_PARAM = re.compile(r"(?P<module>.*?)(?P<param>\.(?:weight|bias))?")

Rule = tuple[re.Pattern[str], Callable[[re.Match[str], UNetLayout], str | None]]


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None, table: Mapping[str, str]) -> str | None:
    """Rename a resnet child (``None`` = the resnet itself); ``None`` result when the child is unknown."""
    if rest is None:
        return ""
    return table.get(rest)


def _attention_child(rest: str | None) -> str | None:
    """Check an attention-block child path (``None`` = the block itself); ``None`` result when it is unknown."""
    if rest is None:
        return ""
    return rest if rest.split(".", 1)[0] in ATTENTION_CHILDREN else None


def _fixed(table: Mapping[str, str]) -> Callable[[re.Match[str], UNetLayout], str | None]:
    return lambda m, _layout: table.get(m.group(0))


def _down_item_to_ldm(m: re.Match[str], lay: UNetLayout) -> str | None:
    i, j, kind, rest = int(m["i"]), int(m["j"]), m["kind"], m["rest"]
    if i >= lay.levels or j >= lay.layers_per_block:
        return None
    if kind == "resnets":
        child = _resnet_child(rest, _RESNET_TO_LDM)
        return None if child is None else _join(f"input_blocks.{lay.input_index(i, j)}.0", child)
    child = _attention_child(rest)
    if child is None or not lay.down_attentions[i]:
        return None
    return _join(f"input_blocks.{lay.input_index(i, j)}.1", child)


def _downsampler_to_ldm(m: re.Match[str], lay: UNetLayout) -> str | None:
    i = int(m["i"])
    if i >= lay.levels - 1:
        return None
    return _join(f"input_blocks.{lay.input_index(i, lay.layers_per_block)}.0", "op" if m["rest"] else None)


def _mid_item_to_ldm(m: re.Match[str], lay: UNetLayout) -> str | None:
    j, kind, rest = int(m["j"]), m["kind"], m["rest"]
    if not lay.mid_block:
        return None
    if kind == "attentions":
        child = _attention_child(rest)
        return None if child is None or j != 0 else _join("middle_block.1", child)
    child = _resnet_child(rest, _RESNET_TO_LDM)
    return None if child is None or j > 1 else _join(f"middle_block.{2 * j}", child)


def _up_item_to_ldm(m: re.Match[str], lay: UNetLayout) -> str | None:
    i, j, kind, rest = int(m["i"]), int(m["j"]), m["kind"], m["rest"]
    if i >= lay.levels or j > lay.layers_per_block:
        return None
    if kind == "resnets":
        child = _resnet_child(rest, _RESNET_TO_LDM)
        return None if child is None else _join(f"output_blocks.{lay.output_index(i, j)}.0", child)
    child = _attention_child(rest)
    if child is None or not lay.up_attentions[i]:
        return None
    return _join(f"output_blocks.{lay.output_index(i, j)}.1", child)


def _upsampler_to_ldm(m: re.Match[str], lay: UNetLayout) -> str | None:
    i = int(m["i"])
    if i >= lay.levels - 1:
        return None
    block = lay.output_index(i, lay.layers_per_block)
    return _join(f"output_blocks.{block}.{lay.upsampler_slot(i)}", m["rest"])


def _input_block_to_diffusers(m: re.Match[str], lay: UNetLayout) -> str | None:
    n, slot, rest = int(m["n"]), int(m["slot"]), m["rest"]
    if n == 0:
        return None  # input_blocks.0.0 (conv_in) is a fixed name
    i, j = divmod(n - 1, lay.layers_per_block + 1)
    if i >= lay.levels:
        return None
    if j == lay.layers_per_block:  # the downsampler position
        if slot != 0 or i >= lay.levels - 1 or rest not in (None, "op"):
            return None
        return _join(f"down_blocks.{i}.downsamplers.0", "conv" if rest else None)
    if slot == 0:
        child = _resnet_child(rest, _RESNET_TO_DIFFUSERS)
        return None if child is None else _join(f"down_blocks.{i}.resnets.{j}", child)
    child = _attention_child(rest)
    if slot == 1 and lay.down_attentions[i] and child is not None:
        return _join(f"down_blocks.{i}.attentions.{j}", child)
    return None


def _middle_block_to_diffusers(m: re.Match[str], lay: UNetLayout) -> str | None:
    slot, rest = int(m["slot"]), m["rest"]
    if not lay.mid_block or slot > 2:
        return None
    if slot == 1:
        child = _attention_child(rest)
        return None if child is None else _join("mid_block.attentions.0", child)
    child = _resnet_child(rest, _RESNET_TO_DIFFUSERS)
    return None if child is None else _join(f"mid_block.resnets.{slot // 2}", child)


def _output_block_to_diffusers(m: re.Match[str], lay: UNetLayout) -> str | None:
    n, slot, rest = int(m["n"]), int(m["slot"]), m["rest"]
    i, j = divmod(n, lay.layers_per_block + 1)
    if i >= lay.levels:
        return None
    if slot == 0:
        child = _resnet_child(rest, _RESNET_TO_DIFFUSERS)
        return None if child is None else _join(f"up_blocks.{i}.resnets.{j}", child)
    child = _attention_child(rest)
    if slot == 1 and lay.up_attentions[i] and child is not None:
        return _join(f"up_blocks.{i}.attentions.{j}", child)
    has_upsampler = i < lay.levels - 1 and j == lay.layers_per_block
    if has_upsampler and slot == lay.upsampler_slot(i) and rest in (None, "conv"):
        return _join(f"up_blocks.{i}.upsamplers.0", rest)
    return None


def _rules(*rules: tuple[str, Callable[[re.Match[str], UNetLayout], str | None]]) -> tuple[Rule, ...]:
    return tuple((re.compile(pattern), handler) for pattern, handler in rules)


#: diffusers → LDM, tried in order; each pattern must match the whole module path.
_TO_LDM: tuple[Rule, ...] = _rules(
    ("|".join(re.escape(k) for k in _FIXED_TO_LDM if k), _fixed(_FIXED_TO_LDM)),
    (rf"down_blocks\.(?P<i>{_IDX})\.(?P<kind>resnets|attentions)\.(?P<j>{_IDX}){_REST}", _down_item_to_ldm),
    (rf"down_blocks\.(?P<i>{_IDX})\.downsamplers\.0(?:\.(?P<rest>conv))?", _downsampler_to_ldm),
    (rf"mid_block\.(?P<kind>resnets|attentions)\.(?P<j>{_IDX}){_REST}", _mid_item_to_ldm),
    (rf"up_blocks\.(?P<i>{_IDX})\.(?P<kind>resnets|attentions)\.(?P<j>{_IDX}){_REST}", _up_item_to_ldm),
    (rf"up_blocks\.(?P<i>{_IDX})\.upsamplers\.0(?:\.(?P<rest>conv))?", _upsampler_to_ldm),
)

#: LDM → diffusers, tried in order; each pattern must match the whole module path.
_TO_DIFFUSERS: tuple[Rule, ...] = _rules(
    ("|".join(re.escape(k) for k in _FIXED_TO_DIFFUSERS if k), _fixed(_FIXED_TO_DIFFUSERS)),
    (rf"input_blocks\.(?P<n>{_IDX})\.(?P<slot>{_IDX}){_REST}", _input_block_to_diffusers),
    (rf"middle_block\.(?P<slot>{_IDX}){_REST}", _middle_block_to_diffusers),
    (rf"output_blocks\.(?P<n>{_IDX})\.(?P<slot>{_IDX}){_REST}", _output_block_to_diffusers),
)


def _convert(path: str, layout: UNetLayout, rules: tuple[Rule, ...], direction: str) -> str:
    if path == "":
        return ""  # the root module
    parts = _PARAM.fullmatch(path)
    assert parts is not None  # the pattern matches every string
    module, param = parts["module"], parts["param"] or ""
    for pattern, handler in rules:
        match = pattern.fullmatch(module)
        if match is not None:
            result = handler(match, layout)
            if result is not None:
                return result + param
            break
    raise UnknownFormatError(f"UNet path {path!r} has no {direction} counterpart for layout {layout}")


def diffusers_to_ldm(path: str, layout: UNetLayout) -> str:
    """The LDM (CompVis/SGM) name of a diffusers UNet module path or state-dict key.

    Example: ``down_blocks.1.attentions.0.proj_in`` → ``input_blocks.4.1.proj_in``. Raises
    :class:`UnknownFormatError` naming ``path`` when it has no single LDM counterpart in ``layout``.
    """
    return _convert(path, layout, _TO_LDM, "LDM")


def ldm_to_diffusers(path: str, layout: UNetLayout) -> str:
    """The diffusers name of an LDM UNet module path or state-dict key (inverse of :func:`diffusers_to_ldm`)."""
    return _convert(path, layout, _TO_DIFFUSERS, "diffusers")
