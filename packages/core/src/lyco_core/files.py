"""Adapter files as Lyco reads them: module groups with their detected algorithm, and metadata.

Reading never needs the base model: :func:`read_adapter` groups tensors by module key (the part before
the first dot), detects each module's algorithm from its tensor names, and reports tensors nothing
understands. :meth:`ModuleTensors.merge` computes the new weight of one module from a base weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import algorithms
from .algorithms import Algorithm
from .errors import CorruptFileError, IncompatibleBaseError
from .layers import LayerInfo

if TYPE_CHECKING:
    from .network.network import AdapterNetwork

_KNOWN_SUFFIXES = frozenset(n for a in algorithms.ALGORITHMS for n in a.tensor_names)


@dataclass
class ModuleTensors:
    """One module of a file: its key, detected algorithm and tensors (file suffix → tensor)."""

    key: str
    algorithm: Algorithm
    tensors: dict[str, torch.Tensor]


    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW (W' − W at multiplier 1) for a base weight of any supported shape, in float32."""
        w = base_weight.float()
        return self.merge(w, None, 1.0)[0] - w

    def merge(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, multiplier: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new weight (and bias) of this module's layer at ``multiplier``, computed in float32
        and returned in ``weight``'s dtype. DoRA, (IA)³ and OFT use their exact (non-additive) rules."""
        self.check_fits(tuple(weight.shape), bias is not None)
        layer = LayerInfo.from_weight(weight.shape, bias is not None)
        t = {k: (v.float() if v.is_floating_point() else v) for k, v in self.tensors.items()}
        b32 = None if bias is None else bias.float()
        new_w, new_b = self.algorithm.merge(weight.float(), b32, t, layer, multiplier)
        return new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype)

    def describe(self) -> dict[str, Any]:
        return self.algorithm.describe(self.tensors)

    @property
    def label(self) -> str:
        """``lora``, ``loha with DoRA``, … for messages."""
        return f"{self.algorithm.name} with DoRA" if "dora_scale" in self.tensors else self.algorithm.name

    def change(self, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ΔW (float32, ``weight_shape``) and Δb (or None) at multiplier 1, from the tensors alone.

        Only for modules whose change does not depend on the base weight (``not self.needs_base``); the others
        need :meth:`merge` with the base weight.
        """
        layer = LayerInfo.from_weight(weight_shape, False)
        t = {k: (v.float() if v.is_floating_point() else v) for k, v in self.tensors.items()}
        self.algorithm.validate(t, layer, self.key)
        dw = self.algorithm.delta_weight(t, layer).reshape(weight_shape)
        db = self.algorithm.delta_bias(t, layer)
        return dw, None if db is None else db.float()

    @property
    def needs_base(self) -> bool:
        """Whether ΔW depends on the base weight: DoRA, (IA)³, OFT/BOFT, GLoRA (non-additive or base-reading)."""
        return self.algorithm.needs_base_weight or not self.algorithm.additive or "dora_scale" in self.tensors

    def check_fits(self, weight_shape: tuple[int, ...], has_bias: bool = False, where: str | None = None) -> None:
        """Raise :class:`IncompatibleBaseError` (naming the key) unless this module fits a layer whose weight has
        ``weight_shape``. Shapes only (meta tensors): nothing is computed."""
        signature = (self.algorithm.name, _shapes(self.tensors), tuple(weight_shape), has_bias)
        if signature in _FITTING:
            return
        name = f"{where}: {self.key}" if where else self.key
        implied = self.algorithm.implied_weight_shape(self.tensors)
        flat = (weight_shape[0], math.prod(weight_shape[1:])) if len(weight_shape) > 2 else tuple(weight_shape)
        if implied is not None and tuple(implied) not in (tuple(weight_shape), flat):
            raise IncompatibleBaseError(
                f"{name}: made for a layer of shape {list(implied)}, the base layer is {list(weight_shape)}"
            )
        layer = LayerInfo.from_weight(weight_shape, has_bias)
        meta = {k: v if v.ndim == 0 else v.to("meta") for k, v in self.tensors.items()}
        try:
            self.algorithm.validate(meta, layer, name)
        except CorruptFileError as e:  # the tensors fit each other (checked on reading): it is the layer
            raise IncompatibleBaseError(str(e).replace("do not fit together", "do not fit the base layer")) from None
        _remember(signature)


@dataclass
class AdapterFile:
    """An adapter file's modules, the tensors nothing understood, and its raw header metadata."""

    path: Path | None
    modules: dict[str, ModuleTensors]
    unknown_tensors: list[str] = field(default_factory=list)
    header: dict[str, str] = field(default_factory=dict)

    def algorithms(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.algorithm.name] = out.get(m.algorithm.name, 0) + 1
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": t for k, m in self.modules.items() for n, t in m.tensors.items()}


def check_partners(algo: Algorithm, t: Mapping[str, torch.Tensor], key: str) -> None:
    """Check that a module's tensors fit each other, without a base model.

    Runs the algorithm's own validation against the layer the tensors imply, on meta tensors (shapes
    only, no arithmetic). Any disagreement is the file's fault, so it is a :class:`CorruptFileError`.
    """
    shape = algo.implied_weight_shape(t)
    if shape is None:
        return
    signature = (algo.name, _shapes(t))
    if signature in _FITTING:
        return
    meta = {k: v if v.ndim == 0 else v.to("meta") for k, v in t.items()}
    try:
        algo.validate(meta, LayerInfo.from_weight(shape), key)
    except IncompatibleBaseError as e:
        raise CorruptFileError(str(e)) from None
    _remember(signature)


#: Shape signatures (algorithm, tensor names and shapes[, layer shape, bias]) found consistent. Validation
#: depends on shapes only, and files repeat a few shapes many times, so each is checked once per process.
_FITTING: set[tuple[Any, ...]] = set()


def _shapes(t: Mapping[str, torch.Tensor]) -> tuple[tuple[str, Any], ...]:
    """Names and shapes of the tensors, and the values of 0-d ones (flags such as (IA)³'s ``on_input``)."""
    return tuple(sorted((k, tuple(v.shape) if v.ndim else float(v)) for k, v in t.items()))


def _remember(signature: tuple[Any, ...]) -> None:
    if len(_FITTING) < 16384:
        _FITTING.add(signature)


def group_modules(
    tensors: Mapping[str, torch.Tensor], source: str = "adapter"
) -> tuple[dict[str, ModuleTensors], list[str]]:
    """Split tensor names at the first dot, detect each module's algorithm, check dtypes.

    Returns the modules and the names of tensors whose suffix no algorithm uses.
    """
    from .formats.naming import split_key

    by_key: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for name, t in tensors.items():
        key, suffix = split_key(name)
        if suffix not in _KNOWN_SUFFIXES:
            unknown.append(name)
            continue
        by_key.setdefault(key, {})[suffix] = t
    modules: dict[str, ModuleTensors] = {}
    for key, group in by_key.items():
        algo = algorithms.detect(group, f"{source}: {key}")
        extra = sorted(set(group) - set(algo.tensor_names))
        if extra:
            unknown.extend(f"{key}.{s}" for s in extra)
            group = {k: v for k, v in group.items() if k in algo.tensor_names}
        algo.check_tensors(group, f"{source}: {key}")
        check_partners(algo, group, f"{source}: {key}")
        modules[key] = ModuleTensors(key, algo, group)
    return modules, unknown


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and validate an adapter file (safetensors); errors name the file and key."""
    from .formats.safetensors_io import load_tensors, read_header

    path = Path(path)
    header = read_header(path)
    tensors = load_tensors(path)
    modules, unknown = group_modules(tensors, str(path))
    return AdapterFile(path, modules, unknown, dict(header.metadata))


def save_adapter(
    network: AdapterNetwork,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: Any = None,
    base_family: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``network`` to ``path`` atomically with full metadata (see :mod:`lyco_core.formats.metadata`)."""
    from .formats.metadata import to_header
    from .formats.safetensors_io import payload_sha256_of, save_tensors

    tensors = network.file_tensors(dtype)
    meta = network_metadata(network, metadata, base_family)
    save_tensors(path, tensors, to_header(meta, payload_sha256_of(tensors)), overwrite=overwrite)
    return Path(path)


def write_adapter(
    path: str | Path,
    modules: Mapping[str, ModuleTensors],
    *,
    source_header: Mapping[str, str] | None = None,
    metadata: Any = None,
    note: str | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write modules (from a file, or made by an operation) to ``path`` atomically, with full metadata.

    Metadata: ``metadata`` (an ``AdapterMetadata`` or a dict of its fields) when given, else the Lyco metadata
    of ``source_header`` (the input file's header) when it has some, else the family other tools' keys claim.
    Module summaries and algorithm counts are always recomputed from ``modules``; ``note`` (what the operation
    did) is put in front of the training comment, as sd-scripts' tools do. ``shapes`` gives the ΔW shape of
    modules whose tensors do not imply it (e.g. (IA)³, OFT); otherwise the source's summary, else ``()``.
    ``dtype`` casts floating tensors (alpha too, as sd-scripts does). Refuses to overwrite unless ``overwrite``.
    """
    from .formats.metadata import AdapterMetadata, BaseModelInfo, ModuleSummary, family_from_header, read_metadata
    from .formats.safetensors_io import save_tensors

    given: dict[str, Any]
    old_modules: Mapping[str, ModuleSummary] = {}
    if isinstance(metadata, AdapterMetadata):
        given = metadata.model_dump()
    elif metadata is not None:
        given = dict(metadata)
    else:
        given = {}
        if source_header:
            read = read_metadata(source_header)
            if read.lyco is not None:
                old_modules = read.lyco.modules
                given = read.lyco.model_dump(exclude={"created_at", "created_by"})
            else:
                family, _ = family_from_header(source_header)
                given = {"base": BaseModelInfo(family=family).model_dump()}
    summaries = {}
    for key, m in modules.items():
        shape = (shapes or {}).get(key) or m.algorithm.implied_weight_shape(m.tensors)
        if shape is None:
            shape = old_modules[key].shape if key in old_modules else ()
        summaries[key] = ModuleSummary.from_describe(m.describe(), shape)
    given["modules"] = summaries
    given["algorithms"] = {}
    if note:
        training = dict(given.get("training") or {})
        training["comment"] = note if not training.get("comment") else f"{note}; {training['comment']}"
        given["training"] = training
    meta = AdapterMetadata.model_validate(given)
    tensors = {}
    for key, m in modules.items():
        for name, t in m.tensors.items():
            t = t.detach().to("cpu")
            cast = dtype is not None and t.is_floating_point()
            tensors[f"{key}.{name}"] = (t.to(dtype) if cast else t).contiguous()
    save_tensors(path, tensors, to_header_of(meta, tensors), overwrite=overwrite)
    return Path(path)


def to_header_of(meta: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors header for ``tensors`` described by ``meta`` (payload hash included)."""
    from .formats.metadata import to_header
    from .formats.safetensors_io import payload_sha256_of

    return to_header(meta, payload_sha256_of(tensors))


def network_metadata(network: AdapterNetwork, metadata: Any = None, base_family: str | None = None) -> Any:
    """The :class:`~lyco_core.formats.metadata.AdapterMetadata` of a network: module summaries and algorithm
    counts from the modules themselves, network options from its config, the rest from ``metadata``
    (an ``AdapterMetadata`` or a dict of its fields)."""
    from .formats.metadata import AdapterMetadata, BaseModelInfo, ModuleSummary, NetworkInfo

    # only what the caller set: defaults (e.g. network=lora) must not hide the network's own facts
    given = metadata.model_dump(exclude_unset=True) if isinstance(metadata, AdapterMetadata) else dict(metadata or {})
    modules = {
        m.key: ModuleSummary.from_describe(m.algorithm.describe(m.tensors()), m.layer.weight_shape) for m in network
    }
    cfg = network.config
    if "network" not in given and cfg is not None:
        preset = cfg.preset if isinstance(cfg.preset, str) else cfg.preset.name
        options = cfg.model_dump(exclude={"algo", "dim", "alpha", "preset"}, exclude_defaults=True)
        given["network"] = NetworkInfo(algo=cfg.algo, dim=cfg.dim, alpha=cfg.alpha, preset=preset, options=options)
    if base_family is not None:
        base = dict(given.get("base") or {})
        base["family"] = base_family
        given["base"] = BaseModelInfo.model_validate(base)
    given["modules"] = modules
    given["algorithms"] = network.summary()
    return AdapterMetadata.model_validate(given)
