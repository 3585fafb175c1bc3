"""Networks: a set of adapter modules over one model (UNet, text encoders, or any torch module).

>>> net = create_network({"unet": unet, "te": text_encoder}, algo="lokr", preset="attn-mlp", dim=8)
>>> net.apply()          # adapters active in forward
>>> net.save("out.safetensors")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError
from torch import nn

from .. import algorithms
from ..algorithms.base import AdapterOptions
from ..errors import IncompatibleBaseError, InvalidConfigError
from ..layers import is_adaptable, is_norm_layer
from .module import AdapterModule
from .targeting import Preset, load_preset, overrides_for, select_modules

Components = list[tuple[str, nn.Module]]


class NetworkConfig(AdapterOptions):
    """Network-wide options: the module options plus how to pick modules and conv ranks."""

    preset: str | Preset = Field("full", description="built-in preset name, a .toml path, or a Preset")
    conv_dim: int | None = Field(None, ge=0, description="rank for k×k convs (default: dim; 0 disables them)")
    conv_alpha: float | None = Field(None, description="alpha for k×k convs (default: alpha)")
    multiplier: float = Field(1.0, description="strength μ of the whole network")


def resolve_components(model: nn.Module | Mapping[str, nn.Module]) -> Components:
    """``(role, module)`` pairs. A mapping's keys are roles (``unet``, ``te``, ``te1``, ``te2``,
    ``text_encoder``, ``text_encoder_2``); a single module gets its role from its class."""
    from ..formats import naming

    if isinstance(model, nn.Module):
        return [(naming.guess_role(model), model)]
    roles = dict(model)
    if "text_encoder" in roles and "text_encoder_2" in roles:
        roles["te1"] = roles.pop("text_encoder")
    out: Components = []
    for role, module in roles.items():
        if module is None:
            continue
        if role not in naming.ROLE_PREFIX:
            raise InvalidConfigError(f"model: unknown component role {role!r}; use one of {sorted(naming.ROLE_PREFIX)}")
        out.append((role, module))
    return out


def _config(config: NetworkConfig | Mapping[str, Any] | None, kwargs: dict[str, Any]) -> NetworkConfig:
    data = dict(config.model_dump() if isinstance(config, NetworkConfig) else config or {})
    data.update(kwargs)
    try:
        return NetworkConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise InvalidConfigError(f"{loc}: {err['msg']}") from None


def _class_chain(component: nn.Module, path: str) -> tuple[str, ...]:
    """Class names of the layer at ``path`` and of all its parents (for per-class overrides)."""
    names = [type(component).__name__]
    mod = component
    for part in path.split(".") if path else ():
        mod = getattr(mod, part)
        names.append(type(mod).__name__)
    return tuple(names)


def _module_options(cfg: NetworkConfig, preset: Preset, module: nn.Module, overrides: dict[str, Any]) -> AdapterOptions:
    base = cfg.model_dump(exclude={"preset", "conv_dim", "conv_alpha", "multiplier"})
    if preset.algo is not None:
        base["algo"] = preset.algo
    if is_norm_layer(module):
        base["algo"] = "norm"
    kernel = getattr(module, "kernel_size", (1,))
    if not all(k == 1 for k in kernel):
        if cfg.conv_dim is not None:
            base["dim"] = cfg.conv_dim
        if cfg.conv_alpha is not None:
            base["alpha"] = cfg.conv_alpha
    base.update(overrides)
    try:
        return AdapterOptions.model_validate(base)
    except ValidationError as e:
        err = e.errors()[0]
        raise InvalidConfigError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


class AdapterNetwork(nn.Module):
    """A set of :class:`AdapterModule` keyed by their file keys."""

    def __init__(self, modules: Iterable[AdapterModule], config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        for m in modules:
            if m.key in self.adapters:
                raise InvalidConfigError(f"{m.key}: two modules map to the same key")
            self.adapters[m.key] = m
        self.config = config
        self.applied = False

    def __iter__(self) -> Iterator[AdapterModule]:  # type: ignore[override]
        return iter(self.adapters.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.adapters)

    # ------------------------------------------------------------------------------------------ run time
    def apply(self, fn: Callable[[nn.Module], None] | None = None) -> AdapterNetwork:  # type: ignore[override]
        """Attach every module to its layer (several networks may be applied to one model).

        With ``fn`` it is ``nn.Module.apply`` (call ``fn`` on every submodule), so torch code that walks a
        module tree with ``apply(fn)`` keeps working when a network sits inside it.
        """
        if fn is not None:
            return super().apply(fn)
        if self.applied:
            raise InvalidConfigError("network is applied already")
        for m in self:
            m.apply_to_base()
        self.applied = True
        return self

    def restore(self) -> None:
        """Detach every module; the model computes exactly what it did before :meth:`apply`."""
        for m in self:
            m.remove_from_base()
        self.applied = False

    def set_multiplier(self, multiplier: float) -> None:
        for m in self:
            m.multiplier = float(multiplier)

    @property
    def multiplier(self) -> float:
        values = {m.multiplier for m in self}
        return values.pop() if len(values) == 1 else float("nan")

    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Write every module's weights into its base layer; :meth:`unmerge` undoes it exactly."""
        for m in self:
            m.merge_into_base(multiplier)

    @torch.no_grad()
    def unmerge(self) -> None:
        for m in self:
            m.unmerge_from_base()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ files
    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor as written to a file, ``{"<module key>.<suffix>": tensor}``."""
        out: dict[str, torch.Tensor] = {}
        for m in self:
            out.update(m.file_tensors(dtype))
        return out

    def save(
        self,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        metadata: Any = None,
        base_family: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write a safetensors adapter file (atomic) with Lyco, kohya ``ss_*`` and ``modelspec`` metadata."""
        from ..files import save_adapter

        return save_adapter(self, path, dtype=dtype, metadata=metadata, base_family=base_family, overwrite=overwrite)

    def summary(self) -> dict[str, int]:
        """Algorithm name → module count."""
        out: dict[str, int] = {}
        for m in self:
            out[m.algorithm.name] = out.get(m.algorithm.name, 0) + 1
        return out


def create_network(
    model: nn.Module | Mapping[str, nn.Module],
    config: NetworkConfig | Mapping[str, Any] | None = None,
    **options: Any,
) -> AdapterNetwork:
    """New adapters on ``model`` as ``config``/``options`` say (see :class:`NetworkConfig`).

    Raises :class:`InvalidConfigError` when an option is unknown or invalid, or when the preset matches
    no module in any component.
    """
    from ..formats import naming

    cfg = _config(config, options)
    algorithms.get(cfg.algo)
    preset = load_preset(cfg.preset)
    modules: list[AdapterModule] = []
    for role, component in resolve_components(model):
        spec = preset.spec_for(role)
        if spec is None:
            continue
        for path, layer in select_modules(component, spec, preset):
            if cfg.conv_dim == 0 and not all(k == 1 for k in getattr(layer, "kernel_size", (1,))):
                continue
            opts = _module_options(cfg, preset, layer, overrides_for(preset, path, _class_chain(component, path)))
            algo = algorithms.get(opts.algo)
            key = naming.canonical_key(component, role, path)
            modules.append(AdapterModule(key, layer, algo, opts, multiplier=cfg.multiplier))
    if not modules:
        roles = ", ".join(f"{r} ({type(c).__name__})" for r, c in resolve_components(model))
        raise InvalidConfigError(f"preset {preset.name!r} matched no module in {roles}")
    return AdapterNetwork(modules, cfg)


@dataclass
class LoadReport:
    """What a file load matched, and everything it could not use (never dropped in silence)."""

    loaded: list[str] = field(default_factory=list)
    unmatched_modules: list[str] = field(default_factory=list)
    unknown_tensors: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unmatched_modules and not self.unknown_tensors


def network_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    model: nn.Module | Mapping[str, nn.Module],
    *,
    multiplier: float = 1.0,
    strict: bool = True,
    source: str = "adapter",
) -> tuple[AdapterNetwork, LoadReport]:
    """Rebuild a network from file tensors onto ``model``; algorithms are detected per module.

    With ``strict`` any module key that matches no layer, or any tensor no algorithm understands, is an
    :class:`IncompatibleBaseError` naming it; otherwise they are listed in the report.
    """
    from ..files import group_modules
    from ..formats import naming

    index: dict[str, tuple[str, nn.Module, nn.Module]] = {}
    for role, component in resolve_components(model):
        layers = {p: m for p, m in component.named_modules() if is_adaptable(m) or is_norm_layer(m)}
        for key, path in naming.build_key_index(component, role, layers).items():
            index[key] = (role, component, layers[path])
    report = LoadReport()
    modules: list[AdapterModule] = []
    groups, unknown = group_modules(tensors, source)
    report.unknown_tensors.extend(unknown)
    for key, group in groups.items():
        if key not in index:
            report.unmatched_modules.append(key)
            continue
        _, _, layer = index[key]
        algo = algorithms.detect(group.tensors, key)
        opts = AdapterOptions(algo=algo.name, dim=algo.rank(group.tensors) or 1)
        modules.append(AdapterModule(key, layer, algo, opts, group.tensors, multiplier=multiplier))
        report.loaded.append(key)
    if strict and not report.complete:
        what = report.unmatched_modules[:3] + report.unknown_tensors[:3]
        n = len(report.unmatched_modules) + len(report.unknown_tensors)
        raise IncompatibleBaseError(f"{source}: {n} key(s) do not fit this model, e.g. {', '.join(what)}")
    if not modules:
        raise IncompatibleBaseError(f"{source}: no module of the file matches this model")
    return AdapterNetwork(modules), report
