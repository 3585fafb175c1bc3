"""Which modules of a model get adapters: presets (TOML, validated) and the selection rule.

Selection, per component (``unet``, text encoders, or a generic module):

1. every descendant of a module whose class name is in ``target_module`` is a candidate;
2. every module whose dotted path matches a ``target_name`` pattern is a candidate (a container's
   descendants too);
3. paths matching ``exclude_name`` are removed;
4. a candidate gets an adapter if it is a Linear/Conv (convs with a k×k kernel, k≠1, only when
   ``enable_conv``), or a norm layer when ``train_norm``.

Patterns are shell globs matched against the whole dotted path (``*.to_k``), or regular expressions
matched against the whole path when written ``re:<regex>``. Class names match exactly.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatchcase
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from ..algorithms.base import AdapterOptions
from ..errors import InvalidConfigError, NotFoundError
from ..layers import is_adaptable, is_norm_layer


class TargetSpec(BaseModel):
    """Targets inside one kind of component."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_module: tuple[str, ...] = Field((), description="class names whose descendants are targeted")
    target_name: tuple[str, ...] = Field((), description="globs (or re:…) over dotted module paths")
    exclude_name: tuple[str, ...] = Field((), description="globs (or re:…) of paths to leave alone")


class Override(BaseModel):
    """Options for the modules whose path matches ``name`` or whose block/layer class is ``module``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    module: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_selector(self) -> Override:
        if (self.name is None) == (self.module is None):
            raise ValueError("an override needs exactly one of `name` or `module`")
        unknown = set(self.options) - set(AdapterOptions.model_fields)
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}")
        return self


class Preset(BaseModel):
    """A named module selection (see the module docstring for the rule)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    description: str = ""
    enable_conv: bool = True
    train_norm: bool = False
    algo: str | None = Field(None, description="force this algorithm (e.g. the ia3 preset)")
    unet: TargetSpec | None = None
    text_encoder: TargetSpec | None = None
    default: TargetSpec | None = Field(None, description="targets in components that are neither UNet nor TE")
    override: tuple[Override, ...] = ()

    def spec_for(self, role: str) -> TargetSpec | None:
        if role == "unet":
            return self.unet
        if role.startswith("te") or role.startswith("text_encoder"):
            return self.text_encoder
        return self.default


def builtin_presets() -> list[str]:
    """Names of the presets that ship with Lyco."""
    folder = resources.files("lyco_core") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def parse_preset(data: dict[str, Any], source: str) -> Preset:
    """Validate a preset dict; errors name the source and the offending key."""
    try:
        return Preset.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise InvalidConfigError(f"{source}: {loc}: {err['msg']}") from None


@lru_cache(maxsize=64)
def _load_builtin(name: str) -> Preset:
    text = (resources.files("lyco_core") / "presets" / f"{name}.toml").read_text()
    data = tomllib.loads(text)
    data.setdefault("name", name)
    return parse_preset(data, f"preset {name}")


def load_preset(preset: str | Path | Preset | dict[str, Any]) -> Preset:
    """A built-in preset by name, a TOML file by path, a dict, or a Preset as is."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, dict):
        return parse_preset(preset, "preset")
    text = str(preset)
    if text in builtin_presets():
        return _load_builtin(text)
    path = Path(text)
    if path.suffix == ".toml":
        if not path.is_file():
            raise NotFoundError(f"{path}: preset file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidConfigError(f"{path}: not valid TOML ({e})") from None
        data.setdefault("name", path.stem)
        return parse_preset(data, str(path))
    raise InvalidConfigError(f"preset: unknown preset {text!r}; built-in presets: {', '.join(builtin_presets())}")


def match_pattern(pattern: str, path: str) -> bool:
    """Whole-path match of a glob, or of a regex written ``re:<regex>``."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], path) is not None
        except re.error as e:
            raise InvalidConfigError(f"pattern {pattern!r}: bad regular expression ({e})") from None
    return fnmatchcase(path, pattern)


def select_modules(component: nn.Module, spec: TargetSpec, preset: Preset) -> Iterator[tuple[str, nn.Module]]:
    """The (path, layer) pairs of ``component`` that get adapters, in ``named_modules`` order."""
    modules = dict(component.named_modules())
    chosen: set[str] = set()

    def under(prefix: str) -> Iterator[str]:
        dot = prefix + "." if prefix else ""
        return (p for p in modules if p == prefix or p.startswith(dot))

    for path, module in modules.items():
        if type(module).__name__ in spec.target_module or any(match_pattern(p, path) for p in spec.target_name):
            chosen.update(under(path))
    for path in list(chosen):
        if any(match_pattern(p, path) for p in spec.exclude_name):
            chosen.difference_update(under(path))
    for path, module in modules.items():
        if path not in chosen:
            continue
        if is_adaptable(module):
            kernel = getattr(module, "kernel_size", (1,))
            if all(k == 1 for k in kernel) or preset.enable_conv:
                yield path, module
        elif preset.train_norm and is_norm_layer(module):
            yield path, module


def overrides_for(preset: Preset, path: str, classes: tuple[str, ...]) -> dict[str, Any]:
    """Option overrides for one module; later overrides win. ``classes``: the layer's and its parents' classes."""
    out: dict[str, Any] = {}
    for ov in preset.override:
        if (ov.name is not None and match_pattern(ov.name, path)) or (ov.module is not None and ov.module in classes):
            out.update(ov.options)
    return out
