"""kohya / LyCORIS module keys ↔ dotted module paths, without the model.

A kohya key is ``<prefix>_<module path with "." → "_">`` (spec ecosystem-formats §1.1). Many SD module names
contain ``_`` themselves (``to_q``, ``proj_in``, ``transformer_blocks``, ``time_emb_proj``), so ``_`` → ``.``
cannot be undone by string rules (§1.4 "Underscore ambiguity"). :func:`parse_key` instead splits the key at
every ``_`` and finds, by dynamic programming, the ways to regroup the tokens into path segments such that the
path follows a *grammar* of the SD module trees: which segment names (vocabulary words, or integers ``#``) may
follow which. Exactly one parse must exist; otherwise the key is unknown or ambiguous and
:class:`~lyco_core.errors.UnknownFormatError` names it.

Grammars (:data:`UNET_DIFFUSERS`, :data:`UNET_LDM`, :data:`CLIP_TEXT`) cover the diffusers
``UNet2DConditionModel`` of SD 1.x / 2.x / SDXL, the LDM/SGM UNet (``input_blocks`` …) and the HF
``transformers`` CLIP text model, with or without its ``text_model.`` level (transformers 5 ``CLIPTextModel``
dropped it; kohya files keep it). A path may stop at any node, so containers (``ff.net.0``) parse too.

The parsed path stays *as written in the file*; :func:`to_diffusers_path` / :func:`to_ldm_path` rename UNet
paths with :mod:`.unet_naming` (text-encoder paths are the same in every convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Literal

from ..errors import InvalidConfigError, UnknownFormatError
from .unet_naming import UNetLayout, diffusers_to_ldm, ldm_to_diffusers

__all__ = [
    "CLIP_TEXT",
    "KEY_PREFIXES",
    "UNET_DIFFUSERS",
    "UNET_LDM",
    "KeyPath",
    "format_key",
    "parse_key",
    "parse_path",
    "to_diffusers_path",
    "to_ldm_path",
    "with_naming",
]

Role = Literal["unet", "te", "te1", "te2", "lycoris"]
Naming = Literal["diffusers", "ldm", "clip"]

#: A grammar node: child segment name → node; the name ``"#"`` stands for any integer segment.
Grammar = Mapping[str, "Grammar"]
INT = "#"
_LEAF: Grammar = MappingProxyType({})


def _g(**children: Grammar) -> Grammar:
    """A grammar node from keyword children (``_`` in a keyword stays ``_``; use :func:`_n` for integers)."""
    return MappingProxyType(dict(children))


def _n(child: Grammar) -> Grammar:
    """A node whose only child is an integer segment."""
    return MappingProxyType({INT: child})


def _leaves(*names: str) -> dict[str, Grammar]:
    return dict.fromkeys(names, _LEAF)


# ----- UNet: diffusers names ---------------------------------------------------------------------------------------
_ATTENTION = _g(**_leaves("to_q", "to_k", "to_v", "norm_q", "norm_k"), to_out=_n(_LEAF))
_FEED_FORWARD = _g(net=_n(_g(proj=_LEAF)))
_TRANSFORMER_BLOCK = _g(**_leaves("norm1", "norm2", "norm3"), attn1=_ATTENTION, attn2=_ATTENTION, ff=_FEED_FORWARD)
#: Children of a diffusers ``Transformer2DModel`` / LDM ``SpatialTransformer`` (identical on both sides).
_SPATIAL_TRANSFORMER = _g(**_leaves("norm", "proj_in", "proj_out"), transformer_blocks=_n(_TRANSFORMER_BLOCK))
_RESNET = _g(**_leaves("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"))
_SAMPLER = _g(conv=_LEAF)
_UNET_BLOCK = _g(attentions=_n(_SPATIAL_TRANSFORMER), resnets=_n(_RESNET))
_EMBEDDING = _g(**_leaves("linear_1", "linear_2", "cond_proj"))

#: diffusers ``UNet2DConditionModel`` paths (SD 1.x, SD 2.x, SDXL).
UNET_DIFFUSERS: Grammar = _g(
    **_leaves("conv_in", "conv_out", "conv_norm_out"),
    time_embedding=_EMBEDDING,
    add_embedding=_EMBEDDING,
    down_blocks=_n(_g(**_UNET_BLOCK, downsamplers=_n(_SAMPLER))),
    mid_block=_UNET_BLOCK,
    up_blocks=_n(_g(**_UNET_BLOCK, upsamplers=_n(_SAMPLER))),
)

# ----- UNet: LDM / SGM names ---------------------------------------------------------------------------------------
_RES_BLOCK = _g(in_layers=_n(_LEAF), emb_layers=_n(_LEAF), out_layers=_n(_LEAF), skip_connection=_LEAF)
#: One entry of an LDM ``TimestepEmbedSequential``: a ResBlock, a SpatialTransformer, a Downsample (``op``) or an
#: Upsample (``conv``); ``input_blocks.0.0`` is the bare input conv.
_LDM_LAYER = _g(**_RES_BLOCK, **_SPATIAL_TRANSFORMER, op=_LEAF, conv=_LEAF)

#: LDM (CompVis / SGM) UNet paths.
UNET_LDM: Grammar = _g(
    input_blocks=_n(_n(_LDM_LAYER)),
    middle_block=_n(_LDM_LAYER),
    output_blocks=_n(_n(_LDM_LAYER)),
    time_embed=_n(_LEAF),
    label_emb=_n(_n(_LEAF)),
    out=_n(_LEAF),
)

# ----- text encoders: HF transformers CLIP -------------------------------------------------------------------------
_CLIP_LAYER = _g(
    self_attn=_g(**_leaves("q_proj", "k_proj", "v_proj", "out_proj")),
    mlp=_g(**_leaves("fc1", "fc2")),
    **_leaves("layer_norm1", "layer_norm2"),
)
_CLIP_TRANSFORMER = _g(
    embeddings=_g(**_leaves("token_embedding", "position_embedding")),
    encoder=_g(layers=_n(_CLIP_LAYER)),
    final_layer_norm=_LEAF,
)

#: HF ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` paths, with the ``text_model.`` level (transformers 4,
#: kohya files) or without it (transformers 5 ``CLIPTextModel``).
CLIP_TEXT: Grammar = _g(text_model=_CLIP_TRANSFORMER, text_projection=_LEAF, **_CLIP_TRANSFORMER)

_NAMINGS: tuple[tuple[Naming, Grammar], ...] = (("diffusers", UNET_DIFFUSERS), ("ldm", UNET_LDM), ("clip", CLIP_TEXT))

#: Key prefixes, longest first (``lora_te1`` before ``lora_te``), with their role and the namings they may use.
KEY_PREFIXES: tuple[tuple[str, Role, tuple[Naming, ...]], ...] = (
    ("lora_unet", "unet", ("diffusers", "ldm")),
    ("oft_unet", "unet", ("diffusers", "ldm")),
    ("lora_te1", "te1", ("clip",)),
    ("lora_te2", "te2", ("clip",)),
    ("lora_te", "te", ("clip",)),
    ("lycoris", "lycoris", ("diffusers", "ldm", "clip")),
)

#: The prefix :func:`format_key` writes for each role.
ROLE_PREFIX: Mapping[str, str] = MappingProxyType(
    {"unet": "lora_unet", "te": "lora_te", "te1": "lora_te1", "te2": "lora_te2", "lycoris": "lycoris"}
)


@dataclass(frozen=True)
class KeyPath:
    """A parsed module key.

    ``role``: ``"unet"``, ``"te"`` (SD1/SD2 text encoder), ``"te1"`` / ``"te2"`` (SDXL CLIP-L / bigG) or
    ``"lycoris"`` (the generic ``lycoris_`` prefix of ``create_lycoris``). ``prefix``: as written
    (``lora_unet``, ``oft_unet``, ``lora_te1`` …). ``path``: the dotted module path as written in the file.
    ``naming``: ``"diffusers"`` or ``"ldm"`` for UNet paths, ``"clip"`` for HF CLIP text-model paths.
    """

    role: Role
    prefix: str
    path: str
    naming: Naming

    @property
    def key(self) -> str:
        """The module key this path is written as (``prefix + "_" + path`` with ``.`` → ``_``)."""
        return format_key(self.role, self.path, self.prefix)

    @property
    def is_unet(self) -> bool:
        return self.naming in ("diffusers", "ldm")

    @property
    def component(self) -> str:
        """diffusers pipeline component name: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``."""
        if self.is_unet:
            return "unet"
        return "text_encoder_2" if self.role == "te2" else "text_encoder"


def format_key(role: str, path: str, prefix: str | None = None) -> str:
    """``"lora_unet_down_blocks_0_…"`` from a role (or explicit ``prefix``) and a dotted module path."""
    if prefix is None:
        try:
            prefix = ROLE_PREFIX[role]
        except KeyError:
            raise InvalidConfigError(f"unknown key role {role!r}; expected one of {sorted(ROLE_PREFIX)}") from None
    if not path:
        raise InvalidConfigError(f"empty module path for key prefix {prefix!r}")
    return f"{prefix}_{path.replace('.', '_')}"


# ----- the parser -------------------------------------------------------------------------------------------------
_MAX_PARSES = 2  # we only need to know "none", "one" or "more than one"


@dataclass(frozen=True, eq=False)
class _Node:
    """A compiled grammar node: children as token tuples (``"to_q"`` → ``("to", "q")``), and the integer child."""

    words: tuple[tuple[tuple[str, ...], str, _Node], ...]
    integer: _Node | None


def _compile(grammar: Grammar, done: dict[int, _Node] | None = None) -> _Node:
    """Compile a :data:`Grammar` (shared sub-nodes are compiled once)."""
    done = {} if done is None else done
    if id(grammar) not in done:
        words = tuple((tuple(name.split("_")), name, _compile(child, done))
                      for name, child in grammar.items() if name != INT)
        done[id(grammar)] = _Node(words, _compile(grammar[INT], done) if INT in grammar else None)
    return done[id(grammar)]


_COMPILED: tuple[tuple[Naming, _Node], ...] = tuple((n, _compile(g)) for n, g in _NAMINGS)


def _parses(tokens: tuple[str, ...], start: int, node: _Node, memo: dict[tuple[int, int], list[list[str]]]
            ) -> list[list[str]]:
    """Segment lists that spell ``tokens[start:]`` as a path below ``node`` (at most :data:`_MAX_PARSES`)."""
    if start == len(tokens):
        return [[]]
    memo_key = (start, id(node))
    if memo_key in memo:
        return memo[memo_key]
    out: list[list[str]] = []
    tok = tokens[start]
    if node.integer is not None and tok.isdigit():
        out += [[tok, *rest] for rest in _parses(tokens, start + 1, node.integer, memo)]
    for word_tokens, name, child in node.words:
        if len(out) >= _MAX_PARSES:
            break
        end = start + len(word_tokens)
        if tokens[start:end] == word_tokens:
            out += [[name, *rest] for rest in _parses(tokens, end, child, memo)]
    memo[memo_key] = out[:_MAX_PARSES]
    return memo[memo_key]


def _parse_underscored(
    text: str, namings: tuple[Naming, ...], what: str, grammars: tuple[tuple[Naming, _Node], ...] = _COMPILED
) -> tuple[str, Naming]:
    tokens = tuple(text.split("_"))
    found: list[tuple[str, Naming]] = []
    for naming, root in grammars:
        if naming in namings:
            found += [(".".join(p), naming) for p in _parses(tokens, 0, root, {})]
    if not found:
        raise UnknownFormatError(f"{what}: no known {'/'.join(namings)} module path spells {text!r}")
    if len(found) > 1:
        options = " or ".join(f"{p!r} ({n})" for p, n in found)
        raise UnknownFormatError(f"{what}: ambiguous module path {text!r}: {options}")
    return found[0]


def parse_key(key: str) -> KeyPath:
    """Parse a kohya / LyCORIS module key (no ``.param`` suffix) into role, prefix, dotted path and naming.

    ``lora_unet_down_blocks_0_attentions_0_proj_in`` → ``KeyPath("unet", "lora_unet",
    "down_blocks.0.attentions.0.proj_in", "diffusers")``. Raises :class:`UnknownFormatError` naming ``key``
    when the prefix is unknown, or when not exactly one grammar path spells the rest.
    """
    if "." in key:
        raise UnknownFormatError(f"module key {key!r} contains '.'; pass the part before '.<param>'")
    for prefix, role, namings in KEY_PREFIXES:
        if key.startswith(prefix + "_"):
            path, naming = _parse_underscored(key[len(prefix) + 1 :], namings, f"module key {key!r}")
            return KeyPath(role, prefix, path, naming)
    known = ", ".join(p + "_" for p, _, _ in KEY_PREFIXES)
    raise UnknownFormatError(f"module key {key!r} has no known prefix ({known})")


def parse_path(path: str) -> Naming:
    """The naming (``"diffusers"``, ``"ldm"``, ``"clip"``) of a dotted module path, checked against the grammars.

    Raises :class:`UnknownFormatError` naming ``path`` when no grammar (or more than one) accepts it.
    """
    segments = path.split(".")
    found: list[Naming] = []
    for naming, grammar in _NAMINGS:
        node: Grammar | None = grammar
        for seg in segments:
            assert node is not None
            node = node.get(INT) if seg.isdigit() else node.get(seg)
            if node is None:
                break
        if node is not None:
            found.append(naming)
    if len(found) != 1:
        raise UnknownFormatError(f"module path {path!r} is not a known SD UNet / CLIP text-model path")
    return found[0]


# ----- renaming ---------------------------------------------------------------------------------------------------
def _layout(family: str | UNetLayout) -> UNetLayout:
    return family if isinstance(family, UNetLayout) else UNetLayout.for_family(family)


def to_diffusers_path(kp: KeyPath, family: str | UNetLayout) -> str:
    """The diffusers module path of ``kp`` (UNet LDM paths renamed for ``family`` — ``"sd1"``, ``"sd2"``,
    ``"sdxl"`` — or a :class:`UNetLayout`; text-encoder paths unchanged).

    Raises :class:`UnknownFormatError` when an LDM path has no diffusers counterpart in that layout.
    """
    if kp.naming == "ldm":
        return ldm_to_diffusers(kp.path, _layout(family))
    return kp.path


def to_ldm_path(kp: KeyPath, family: str | UNetLayout) -> str:
    """The LDM module path of ``kp`` (UNet diffusers paths renamed; text-encoder paths unchanged)."""
    if kp.naming == "diffusers":
        return diffusers_to_ldm(kp.path, _layout(family))
    return kp.path


def with_naming(kp: KeyPath, naming: Literal["diffusers", "ldm"], family: str | UNetLayout) -> KeyPath:
    """``kp`` with its UNet path in ``naming`` (same role and prefix); text-encoder keys come back unchanged."""
    if not kp.is_unet or kp.naming == naming:
        return kp
    if naming == "diffusers":
        return replace(kp, path=to_diffusers_path(kp, family), naming="diffusers")
    if naming == "ldm":
        return replace(kp, path=to_ldm_path(kp, family), naming="ldm")
    raise InvalidConfigError(f"unknown UNet naming {naming!r}; expected 'diffusers' or 'ldm'")
