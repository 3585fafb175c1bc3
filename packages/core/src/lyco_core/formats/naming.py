"""kohya / LyCORIS module keys: from a torch module path to the key a file uses, and back.

A kohya/LyCORIS tensor name is ``<module key>.<param>`` with ``module key = <prefix>_<path, "." → "_">``. The
path is the module's path *as the trainer that wrote the file saw it*, which is not always the path in the model
Lyco holds:

* SDXL UNets: sd-scripts trains the SGM UNet, so files use LDM paths (``input_blocks.4.1.…``); a diffusers
  UNet2DConditionModel must be renamed with :mod:`.unet_naming`. SD1/SD2 UNets keep diffusers paths.
* CLIP text encoders: files say ``text_model.encoder.…``; transformers 5 ``CLIPTextModel`` dropped the
  ``text_model`` level (``CLIPTextModelWithProjection`` keeps it), so it is put back.

``"_"`` → ``"."`` cannot be undone by string rules, so keys are never parsed back: :func:`build_key_index` enumerates
the keys every module path may be written under (the canonical one plus the aliases other writers use) and maps
them to the path. The per-kind behaviour lives in one table, :data:`NAMING_RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from ..errors import InvalidConfigError, UnknownFormatError
from .unet_naming import UNetLayout, diffusers_to_ldm

__all__ = [
    "NAMING_RULES",
    "PREFIX_ALIASES",
    "ROLE_PREFIX",
    "build_key_index",
    "canonical_key",
    "component_kind",
    "file_path",
    "guess_role",
    "module_key",
    "split_key",
]

#: Role of a model component → kohya/LyCORIS key prefix.
ROLE_PREFIX: Mapping[str, str] = MappingProxyType(
    {
        "unet": "lora_unet",
        "te": "lora_te",
        "text_encoder": "lora_te",
        "te1": "lora_te1",
        "te2": "lora_te2",
        "text_encoder_2": "lora_te2",
        "lycoris": "lycoris",
    }
)

#: Prefixes consumers accept in place of a role's own one (sd-scripts/diffusers write ``lora_te1`` for SD1 too).
PREFIX_ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({"lora_te": ("lora_te1",), "lora_te1": ("lora_te",)})

#: The generic ``create_lycoris`` prefix; it names raw module paths, with no kohya renaming.
GENERIC_ROLE = "lycoris"
_TEXT_MODEL = "text_model"


def module_key(prefix: str, path: str) -> str:
    """``prefix + "_" + path`` with every ``.`` → ``_``; the empty path (the root) gives ``prefix``."""
    return f"{prefix}_{path.replace('.', '_')}" if path else prefix


def split_key(tensor_name: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_up.weight"`` → ``("lora_unet_x", "lora_up.weight")``: cut at the first dot."""
    module, dot, suffix = tensor_name.partition(".")
    if not dot or not module or not suffix:
        raise UnknownFormatError(f"tensor name {tensor_name!r} is not '<module key>.<param>'")
    return module, suffix


def _class_names(component: torch.nn.Module) -> tuple[str, ...]:
    return tuple(cls.__name__ for cls in type(component).__mro__)


def guess_role(component: torch.nn.Module) -> str:
    """``"unet"`` for a UNet class, ``"te"`` for a CLIP text model, else ``"lycoris"`` (generic wrapper)."""
    names = _class_names(component)
    if any(name.startswith("UNet") for name in names):
        return "unet"
    if any(name in ("CLIPTextModel", "CLIPTextModelWithProjection") for name in names):
        return "te"
    return GENERIC_ROLE


# ----- component kinds --------------------------------------------------------------------------------------------
def _unet_config(component: torch.nn.Module) -> Mapping[str, Any] | None:
    """The config of a diffusers ``UNet2DConditionModel``, or ``None`` for anything else."""
    if "UNet2DConditionModel" not in _class_names(component):
        return None
    config = getattr(component, "config", None)
    return config if isinstance(config, Mapping) and "down_block_types" in config else None


def _is_sdxl_unet(component: torch.nn.Module) -> bool:
    config = _unet_config(component)
    if config is None:
        return False
    return config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == 2048


def _is_sd_unet(component: torch.nn.Module) -> bool:
    return _unet_config(component) is not None


def _is_clip_text(component: torch.nn.Module) -> bool:
    return any(name in ("CLIPTextModel", "CLIPTextModelWithProjection") for name in _class_names(component))


def _is_flat_clip_text(component: torch.nn.Module) -> bool:
    return _is_clip_text(component) and _TEXT_MODEL not in dict(component.named_children())


def _try_ldm(component: torch.nn.Module, path: str) -> str | None:
    config = _unet_config(component)
    assert config is not None
    try:
        return diffusers_to_ldm(path, UNetLayout.from_config(config))
    except UnknownFormatError:
        return None


def _ldm_then_diffusers(component: torch.nn.Module, path: str) -> tuple[str | None, ...]:
    return (_try_ldm(component, path), path)


def _diffusers_then_ldm(component: torch.nn.Module, path: str) -> tuple[str | None, ...]:
    return (path, _try_ldm(component, path))


def _with_text_model(_component: torch.nn.Module, path: str) -> tuple[str | None, ...]:
    return (_join(_TEXT_MODEL, path), path)


def _strip_text_model(_component: torch.nn.Module, path: str) -> tuple[str | None, ...]:
    head = _TEXT_MODEL + "."
    return (path, path[len(head) :]) if path.startswith(head) else (path,)


def _as_is(_component: torch.nn.Module, path: str) -> tuple[str | None, ...]:
    return (path,)


def _join(head: str, path: str) -> str:
    return f"{head}.{path}" if path else head


@dataclass(frozen=True)
class NamingRule:
    """How one kind of component names its modules in kohya files.

    ``file_paths(component, path)`` returns the file-side paths of a module: the canonical one first (``None``
    when the module has no canonical name), then aliases other writers use. ``generic_alias`` says whether
    consumers (ComfyUI) also accept ``lycoris_<model path>`` for this kind.
    """

    kind: str
    matches: Callable[[torch.nn.Module], bool]
    file_paths: Callable[[torch.nn.Module, str], tuple[str | None, ...]]
    generic_alias: bool = False


#: First matching rule wins.
NAMING_RULES: tuple[NamingRule, ...] = (
    NamingRule("sdxl_unet", _is_sdxl_unet, _ldm_then_diffusers, generic_alias=True),
    NamingRule("sd_unet", _is_sd_unet, _diffusers_then_ldm, generic_alias=True),
    NamingRule("clip_text_flat", _is_flat_clip_text, _with_text_model),
    NamingRule("clip_text", _is_clip_text, _strip_text_model),
    NamingRule("generic", lambda _component: True, _as_is),
)


def _rule(component: torch.nn.Module) -> NamingRule:
    return next(rule for rule in NAMING_RULES if rule.matches(component))


def component_kind(component: torch.nn.Module) -> str:
    """The :data:`NAMING_RULES` kind of ``component`` (``"sdxl_unet"``, ``"clip_text_flat"``, …)."""
    return _rule(component).kind


def _prefix(role: str) -> str:
    try:
        return ROLE_PREFIX[role]
    except KeyError:
        raise InvalidConfigError(f"unknown component role {role!r}; expected one of {sorted(ROLE_PREFIX)}") from None


def file_path(component: torch.nn.Module, role: str, path: str) -> str:
    """The module path as kohya/LyCORIS files write it (see the module docstring).

    The generic role ``"lycoris"`` names raw module paths (that is what ``create_lycoris`` does). Raises
    :class:`UnknownFormatError` when the module has no name in that convention (e.g. an SDXL UNet module with
    no LDM counterpart).
    """
    _prefix(role)
    if role == GENERIC_ROLE:
        return path
    rule = _rule(component)
    canonical = rule.file_paths(component, path)[0]
    if canonical is None:
        raise UnknownFormatError(f"module {path!r} of a {rule.kind} has no kohya name")
    return canonical


def canonical_key(component: torch.nn.Module, role: str, path: str) -> str:
    """The key Lyco writes for module ``path`` of ``component`` in role ``role``."""
    return module_key(_prefix(role), file_path(component, role, path))


def _keys_for(component: torch.nn.Module, rule: NamingRule, role: str, path: str) -> list[str]:
    """Every key a file may use for ``path``, canonical first."""
    prefix = _prefix(role)
    if role == GENERIC_ROLE:
        return [module_key(prefix, path)]
    prefixes = (prefix, *PREFIX_ALIASES.get(prefix, ()))
    paths = [p for p in rule.file_paths(component, path) if p is not None]
    keys = [module_key(pre, p) for p in paths for pre in prefixes]
    if rule.generic_alias and role == "unet":
        keys.append(module_key(ROLE_PREFIX[GENERIC_ROLE], path))
    return list(dict.fromkeys(keys))


def build_key_index(component: torch.nn.Module, role: str, paths: Iterable[str]) -> dict[str, str]:
    """Map every key a file may use for each of ``paths`` (canonical key and accepted aliases) to the path.

    Aliases: a UNet's diffusers-named and LDM-named ``lora_unet_`` keys (whatever the family) and
    ``lycoris_<diffusers path>``; a CLIP text encoder's keys with and without ``text_model_``; ``lora_te`` ↔
    ``lora_te1`` for roles te/te1. A module with no canonical name is indexed under its aliases only.

    Raises :class:`UnknownFormatError` when one key would stand for two module paths (names that collide once
    ``.`` becomes ``_``), naming both paths.
    """
    rule = _rule(component)
    index: dict[str, str] = {}
    for path in paths:
        for key in _keys_for(component, rule, role, path):
            other = index.setdefault(key, path)
            if other != path:
                raise UnknownFormatError(
                    f"ambiguous key {key!r}: module paths {other!r} and {path!r} of the {rule.kind} "
                    f"({type(component).__name__}) both map to it"
                )
    return index
