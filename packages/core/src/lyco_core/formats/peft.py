"""LoRA files in the dotted diffusers / PEFT styles (spec ecosystem-formats §1.5, §2.2), both ways.

Writing (:func:`write_peft_style`) takes kohya-keyed LoRA :class:`~lyco_core.files.ModuleTensors`:

* ``style="diffusers"``: one safetensors file, what diffusers ``save_lora_weights`` writes and
  ``load_lora_weights`` / ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` read:
  keys ``unet.<diffusers path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.`` / ``text_encoder_2.`` +
  ``text_model.encoder.layers.N.…`` for the text encoders; diffusers drops ``text_model.`` itself for a
  transformers-5 ``CLIPTextModel``), DoRA magnitudes as ``….lora_magnitude_vector``. diffusers keeps no per-module
  alpha: ``__metadata__["lora_adapter_metadata"]`` holds, JSON, the ``LoraConfig`` kwargs of each component
  with keys prefixed ``unet.`` / ``text_encoder.`` / ``text_encoder_2.`` (``r``, ``lora_alpha``, ``rank_pattern``,
  ``alpha_pattern``, ``target_modules``, ``use_dora``, ``lora_bias``), next to ``"format": "pt"``. diffusers
  passes them to ``LoraConfig(**kwargs)`` unchanged.
* ``style="peft"``: a directory with one sub-directory per component (``unet/``, ``text_encoder/``,
  ``text_encoder_2/``), each holding what ``PeftModel.save_pretrained`` writes: ``adapter_config.json``
  (``peft_type: LORA`` and the same LoraConfig fields) and ``adapter_model.safetensors`` with keys
  ``base_model.model.<module path>.lora_A.weight``. Load with ``PeftModel.from_pretrained(unet, "OUT/unet")``
  or ``inject_adapter_in_model(LoraConfig(**cfg), unet)`` + ``set_peft_model_state_dict(unet, tensors)`` (which
  drops the ``base_model.model.`` prefix for a bare model). PEFT matches keys exactly, so the text-encoder paths
  are the model's own: ``text_encoder/`` (``CLIPTextModel``) without ``text_model.`` (transformers ≥ 5; option
  ``flat_clip=False`` for transformers 4), ``text_encoder_2/`` (``CLIPTextModelWithProjection``) with it.

DoRA magnitudes are ``….lora_magnitude_vector`` for the UNet (what PEFT saves) and
``….lora_magnitude_vector.weight`` for text encoders: transformers 5 ``load_adapter`` (diffusers' text-encoder
path) fills them only from that name, and PEFT's own loader accepts it too.

Module paths in ``rank_pattern`` / ``alpha_pattern`` are the regex-escaped full paths (PEFT matches a pattern
``p`` against a module name ``n`` with ``(.*\\.)?(p)$``, so a full path selects exactly that module); text-encoder
patterns and ``target_modules`` leave out ``text_model.`` so that they match with and without that level.

PEFT scales ΔW by ``lora_alpha/r`` and kohya by ``alpha/r`` with the same ``r`` (the tensor rank), so
``lora_alpha`` = the kohya ``alpha``. PEFT DoRA ``W' = m·(W + sBA)/‖W + sBA‖`` per output row equals Lyco's
output-axis DoRA (Lyco adds ε = 1.2e-7 to the norm); ``dora_scale (O, 1[, 1, 1])`` ↔ ``lora_magnitude_vector``
``(O,)`` for Linear and ``(1, O, 1, 1)`` for Conv. Input-axis DoRA and Tucker LoRA (``lora_mid``) have no PEFT
form and raise :class:`~lyco_core.errors.UnknownFormatError`.

Reading (:func:`read_peft_style`) accepts these two layouts and the older diffusers key styles
(``…attn1.processor.to_q_lora.down.weight``, ``…to_q.lora.down.weight``, ``…q_proj.lora_linear_layer.up.weight``)
and returns kohya-keyed LoRA modules.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from .. import algorithms
from ..algorithms.dora import magnitude_on_output
from ..errors import CorruptFileError, FileExistsLycoError, InvalidConfigError, NotFoundError, UnknownFormatError
from ..files import ModuleTensors
from .key_paths import KeyPath, format_key, parse_key, parse_path, to_diffusers_path
from .safetensors_io import atomic_output_dir, atomic_write_bytes, load_tensors, read_header, save_tensors
from .unet_naming import UNetLayout, diffusers_to_ldm

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "COMPONENTS",
    "LORA_METADATA_KEY",
    "read_peft_style",
    "write_peft_style",
]

Style = Literal["diffusers", "peft"]

#: diffusers pipeline components, in file order.
COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
LORA_METADATA_KEY = "lora_adapter_metadata"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_TEXT_MODEL = "text_model."
_LORA_ALGOS = frozenset({"lora", "dylora"})  # ΔW = (α/r)·up·down for both
DOWN, UP, MID, DORA = "lora_down.weight", "lora_up.weight", "lora_mid.weight", "dora_scale"


# ----- writing ----------------------------------------------------------------------------------------------------
@dataclass
class _Out:
    """One module as PEFT names it: component, module path (as the model sees it), tensors."""

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None


def _file_te_path(path: str) -> str:
    """Text-encoder paths with the ``text_model.`` level, as kohya and diffusers files write them."""
    return path if path.startswith(_TEXT_MODEL) or path == "text_projection" else _TEXT_MODEL + path


def _pattern_name(component: str, path: str) -> str:
    """The module name used in ``target_modules`` / pattern keys (text encoders without ``text_model.``)."""
    return path if component == "unet" else path.removeprefix(_TEXT_MODEL)


def _to_peft(m: ModuleTensors, kp: KeyPath, family: str | UNetLayout) -> _Out:
    if m.algorithm.name not in _LORA_ALGOS:
        raise UnknownFormatError(
            f"{m.key}: algorithm {m.algorithm.name!r} has no diffusers/PEFT LoRA form; convert it to LoRA first"
        )
    t = m.tensors
    if MID in t:
        raise UnknownFormatError(f"{m.key}: Tucker LoRA (lora_mid) has no diffusers/PEFT form; convert it first")
    down, up = t[DOWN], t[UP]
    r = int(down.shape[0])
    if down.ndim > 2 and up.ndim == 2:  # DyLoRA writes conv lora_up 2-D; PEFT's lora_B is a 1×1 conv
        up = up.reshape(*up.shape, *([1] * (down.ndim - 2)))
    alpha = float(t["alpha"].float().item()) if "alpha" in t else float(r)
    magnitude = None
    if DORA in t:
        shape = (int(up.shape[0]), *map(int, down.shape[1:]))
        if not magnitude_on_output(t[DORA], shape):
            raise UnknownFormatError(
                f"{m.key}: DoRA magnitude per input channel {tuple(t[DORA].shape)} cannot be expressed in PEFT "
                "(per output channel only)"
            )
        out = shape[0]
        magnitude = t[DORA].reshape(out) if down.ndim == 2 else t[DORA].reshape(1, out, *([1] * (down.ndim - 2)))
    path = to_diffusers_path(kp, family) if kp.is_unet else _file_te_path(kp.path)
    return _Out(kp.component, path, down, up, alpha, magnitude)


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _lora_config(outs: list[_Out]) -> dict[str, Any]:
    """PEFT ``LoraConfig`` kwargs for one component's modules (global r/α = the most frequent, others patterns)."""
    ranks = [int(o.down.shape[0]) for o in outs]
    alphas = [o.alpha for o in outs]
    r, alpha = _most_common(ranks), _most_common(alphas)
    dora = {o.magnitude is not None for o in outs}
    if len(dora) > 1:
        some = next(o.path for o in outs if o.magnitude is None)
        raise UnknownFormatError(
            f"{outs[0].component}: PEFT applies DoRA to all modules of a component or none; {some} has no DoRA "
            "magnitude while others do"
        )
    names = [_pattern_name(o.component, o.path) for o in outs]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): ri for n, ri in zip(names, ranks, strict=True) if ri != r},
        "alpha_pattern": {re.escape(n): a for n, a in zip(names, alphas, strict=True) if a != alpha},
        "target_modules": sorted(names),
        "use_dora": dora == {True},
        "lora_bias": False,
    }


def _magnitude_name(component: str) -> str:
    """PEFT saves DoRA magnitudes as ``….lora_magnitude_vector``; transformers 5 ``load_adapter`` (what diffusers
    uses for text encoders) only fills them from ``….lora_magnitude_vector.weight``, which PEFT accepts too."""
    return "lora_magnitude_vector" if component == "unet" else "lora_magnitude_vector.weight"


def _tensors(outs: list[_Out], key_prefix: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    def cast(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    out: dict[str, torch.Tensor] = {}
    for o in outs:
        base = f"{key_prefix}{o.path}."
        out[base + "lora_A.weight"] = cast(o.down)
        out[base + "lora_B.weight"] = cast(o.up)
        if o.magnitude is not None:
            out[base + _magnitude_name(o.component)] = cast(o.magnitude)
    return out


def _collect(modules: Mapping[str, ModuleTensors], family: str | UNetLayout) -> dict[str, list[_Out]]:
    by_component: dict[str, list[_Out]] = {}
    seen: dict[tuple[str, str], str] = {}
    for key, m in modules.items():
        o = _to_peft(m, parse_key(key), family)
        other = seen.setdefault((o.component, o.path), key)
        if other != key:
            raise UnknownFormatError(f"{key}: same module {o.component}.{o.path} as {other}")
        by_component.setdefault(o.component, []).append(o)
    if not by_component:
        raise InvalidConfigError("no modules to write")
    return {c: by_component[c] for c in COMPONENTS if c in by_component}


def write_peft_style(
    modules: Mapping[str, ModuleTensors],
    path: str | Path,
    *,
    style: Style | str,
    family: str | UNetLayout,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    flat_clip: bool = True,
) -> Path:
    """Write kohya-keyed LoRA ``modules`` in diffusers or PEFT style (see the module docstring); returns the path.

    ``family`` (``"sd1"``, ``"sd2"``, ``"sdxl"`` or a :class:`UNetLayout`) renames LDM-named UNet keys to diffusers
    paths. ``dtype`` casts the factors (default: as stored). ``metadata``: extra ``__metadata__`` entries
    (diffusers style only). ``flat_clip`` (PEFT style only): write ``text_encoder`` (``CLIPTextModel``) paths
    without ``text_model.``, as transformers ≥ 5 names that class's modules (PEFT matches state-dict keys exactly);
    ``False`` keeps the level (transformers 4). ``text_encoder_2`` (``CLIPTextModelWithProjection``) keeps it.

    Raises :class:`UnknownFormatError` naming the module for algorithms other than LoRA/DyLoRA, Tucker LoRA,
    input-axis DoRA, or DoRA on some but not all modules of a component; :class:`FileExistsLycoError` when an
    output exists and not ``overwrite``. Each file is written atomically; a PEFT directory is checked for
    existing files before anything is written.
    """
    if style not in ("diffusers", "peft"):
        raise InvalidConfigError(f"unknown style {style!r}; expected 'diffusers' or 'peft'")
    target = Path(path)
    groups = _collect(modules, family)
    configs = {c: _lora_config(outs) for c, outs in groups.items()}
    if style == "diffusers":
        tensors: dict[str, torch.Tensor] = {}
        for c, outs in groups.items():
            tensors.update(_tensors(outs, f"{c}.", dtype))
        flat = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}
        header = {**(metadata or {}), "format": "pt", LORA_METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}
        save_tensors(target, tensors, header, overwrite=overwrite)
        return target
    if target.exists() and not target.is_dir():
        raise FileExistsLycoError(f"{target}: exists and is not a directory (PEFT style writes a directory)")
    with atomic_output_dir(target, overwrite) as tmp:
        for c, outs in groups.items():
            (tmp / c).mkdir()
            cfg = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "bias": "none",
                   "inference_mode": True, **configs[c]}
            if c == "text_encoder" and flat_clip:
                outs = [replace(o, path=o.path.removeprefix(_TEXT_MODEL)) for o in outs]
            save_tensors(tmp / c / ADAPTER_WEIGHTS, _tensors(outs, PEFT_PREFIX, dtype), {"format": "pt"})
            atomic_write_bytes(tmp / c / ADAPTER_CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return target


# ----- reading ----------------------------------------------------------------------------------------------------
_OLD_ATTN = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
             "to_out": ("to_out.0", "out_proj")}
#: Tensor role by the suffix's ``kind`` group (A/down → lora_down, B/up → lora_up); others use the pattern's name.
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up"}
_SUFFIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?P<path>.+)\.lora_(?P<kind>A|B)\.weight"), "ab"),
    (re.compile(r"(?P<path>.+)\.(?:lora|lora_linear_layer)\.(?P<kind>down|up)\.weight"), "du"),
    (re.compile(r"(?P<path>.+)\.(?P<attn>to_q|to_k|to_v|to_out)_lora\.(?P<kind>down|up)\.weight"), "old"),
    (re.compile(r"(?P<path>.+)\.lora_magnitude_vector(?:\.weight)?"), "magnitude"),
    (re.compile(r"(?P<path>.+)\.alpha"), "alpha"),
)


@dataclass
class _In:
    """One module read from a dotted-style file: its tensors by role."""

    component: str
    path: str
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def _split_component(name: str, default: str | None) -> tuple[str | None, str]:
    for c in COMPONENTS:
        if name.startswith(c + "."):
            return c, name[len(c) + 1 :]
    return default, name.removeprefix(PEFT_PREFIX)


def _component_of_path(path: str, where: str) -> str:
    try:
        naming = parse_path(path)
    except UnknownFormatError:
        raise UnknownFormatError(f"{where}: module path {path!r} is not a known SD UNet / CLIP path") from None
    if naming == "ldm":
        raise UnknownFormatError(f"{where}: LDM path {path!r} in a diffusers/PEFT file")
    return "unet" if naming == "diffusers" else "text_encoder"


def _match_suffix(rest: str) -> tuple[re.Match[str], str] | None:
    for pattern, kind in _SUFFIXES:
        m = pattern.fullmatch(rest)
        if m is not None:
            return m, kind
    return None


def _group(tensors: Mapping[str, torch.Tensor], default: str | None, where: str, into: dict[tuple[str, str], _In]
           ) -> None:
    for name, t in tensors.items():
        component, rest = _split_component(name.replace(".processor.", "."), default)
        found = _match_suffix(rest)
        if found is None:
            raise UnknownFormatError(f"{where}: tensor {name!r} is not a LoRA A/B, magnitude or alpha tensor")
        m, kind = found
        path = m["path"]
        if kind == "old":
            unet_name, te_name = _OLD_ATTN[m["attn"]]
            path = f"{path}.{te_name if path.endswith('self_attn') else unet_name}"
        component = component or _component_of_path(path, f"{where}: {name}")
        if component != "unet":
            path = _file_te_path(path)
        role = _ROLES.get(m.groupdict().get("kind") or "", kind)
        entry = into.setdefault((component, path), _In(component, path))
        if role in entry.parts:
            raise CorruptFileError(f"{where}: two {role} tensors for module {component}.{path}")
        entry.parts[role] = t


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` rule: the first pattern ``p`` with ``(.*\\.)?(p)$`` matching ``name``."""
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return v
    return default


def _alpha(entry: _In, r: int, cfg: Mapping[str, Any] | None) -> float:
    """kohya alpha = PEFT scaling × r (scaling = lora_alpha/r, or /√r with rs-LoRA); no config → stored or r."""
    if cfg is None:
        return float(entry.parts["alpha"].float().item()) if "alpha" in entry.parts else float(r)
    lora_alpha = float(cfg.get("lora_alpha", cfg.get("r", r)))
    patterns = cfg.get("alpha_pattern") or {}
    for name in (entry.path, entry.path.removeprefix(_TEXT_MODEL)):
        value = _pattern_value(patterns, name, None)
        if value is not None:
            lora_alpha = float(value)
            break
    scaling = lora_alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    return scaling * r


def _module(entry: _In, cfg: Mapping[str, Any] | None, key: str, where: str) -> ModuleTensors:
    if "down" not in entry.parts or "up" not in entry.parts:
        raise CorruptFileError(f"{where}: module {entry.component}.{entry.path} lacks its lora A/down or B/up tensor")
    down, up = entry.parts["down"], entry.parts["up"]
    r = int(down.shape[0])
    t: dict[str, torch.Tensor] = {DOWN: down, UP: up, "alpha": torch.tensor(_alpha(entry, r, cfg))}
    if "magnitude" in entry.parts:
        t[DORA] = entry.parts["magnitude"].reshape(int(up.shape[0]), *([1] * (down.ndim - 1)))
    algo = algorithms.get("lora")
    algo.check_tensors(t, f"{where}: {key}")
    return ModuleTensors(key, algo, t)


def _guess_family(entries: Mapping[tuple[str, str], _In]) -> str:
    for (component, path), e in entries.items():
        if component == "text_encoder_2" or path.startswith("add_embedding"):
            return "sdxl"
        if path.endswith("attn2.to_k") and "down" in e.parts and int(e.parts["down"].shape[1]) == 2048:
            return "sdxl"
    return "sd1"


def _sources(path: Path) -> list[tuple[Path, str | None, Mapping[str, Any] | None]]:
    """(safetensors file, default component, LoraConfig kwargs or None) for a file or PEFT directory."""
    if path.is_file():
        cfg_file = path.parent / ADAPTER_CONFIG
        cfg = json.loads(cfg_file.read_text()) if path.name == ADAPTER_WEIGHTS and cfg_file.is_file() else None
        return [(path, None, cfg)]
    if not path.is_dir():
        raise NotFoundError(f"{path}: no such file or directory")
    if (path / ADAPTER_WEIGHTS).is_file():
        return _sources(path / ADAPTER_WEIGHTS)
    out: list[tuple[Path, str | None, Mapping[str, Any] | None]] = []
    for c in COMPONENTS:
        f = path / c / ADAPTER_WEIGHTS
        if f.is_file():
            cfg_file = path / c / ADAPTER_CONFIG
            out.append((f, c, json.loads(cfg_file.read_text()) if cfg_file.is_file() else None))
    if not out:
        raise UnknownFormatError(f"{path}: directory holds no {ADAPTER_WEIGHTS} (PEFT style) in itself or in "
                                 f"{'/, '.join(COMPONENTS)}/")
    return out


def read_peft_style(
    path: str | Path,
    *,
    family: str | None = None,
    naming: Literal["diffusers", "ldm"] | None = None,
) -> tuple[dict[str, ModuleTensors], dict[str, str]]:
    """Read a diffusers- or PEFT-style LoRA (file or directory, see the module docstring) as kohya-keyed modules.

    Returns ``(modules, metadata)``: LoRA :class:`ModuleTensors` keyed ``lora_unet_…`` / ``lora_te_…`` (SD1/SD2)
    or ``lora_te1_…`` / ``lora_te2_…`` (SDXL), and the file's ``__metadata__`` (PEFT directories: the
    ``adapter_config.json`` of each component as ``"<component>.adapter_config"``). Alpha comes from
    ``lora_adapter_metadata`` / ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``),
    else from ``<path>.alpha`` tensors, else alpha = r. ``family`` (``"sd1"``, ``"sd2"``, ``"sdxl"``; guessed from
    the keys when omitted) sets the TE prefixes and the default UNet ``naming``: LDM for SDXL (kohya's canonical
    SDXL names), diffusers otherwise.
    """
    path = Path(path)
    entries: dict[tuple[str, str], _In] = {}
    configs: dict[str, Mapping[str, Any] | None] = {}
    meta: dict[str, str] = {}
    for file, component, cfg in _sources(path):
        where = str(file)
        header = read_header(file)
        meta.update(header.metadata)
        before = set(entries)
        _group(load_tensors(file), component, where, entries)
        if cfg is not None:
            meta[f"{component or 'adapter'}.adapter_config"] = json.dumps(cfg, sort_keys=True)
            for c, _p in set(entries) - before:
                configs[c] = cfg
        elif LORA_METADATA_KEY in header.metadata:
            try:
                flat = json.loads(header.metadata[LORA_METADATA_KEY])
            except json.JSONDecodeError:
                raise CorruptFileError(f"{where}: __metadata__[{LORA_METADATA_KEY!r}] is not JSON") from None
            for c in COMPONENTS:
                sub = {k[len(c) + 1 :]: v for k, v in flat.items() if k.startswith(c + ".")}
                if sub:
                    configs[c] = sub
    if not entries:
        raise UnknownFormatError(f"{path}: no LoRA tensors found")
    family = family or _guess_family(entries)
    layout = UNetLayout.for_family(family)
    naming = naming or ("ldm" if family == "sdxl" else "diffusers")
    te_role = {"text_encoder": "te1" if family == "sdxl" else "te", "text_encoder_2": "te2"}
    modules: dict[str, ModuleTensors] = {}
    for (component, p), entry in entries.items():
        want = "diffusers" if component == "unet" else "clip"
        if _component_of_path(p, f"{path}: {component}.{p}") != ("unet" if want == "diffusers" else "text_encoder"):
            raise UnknownFormatError(f"{path}: {component}.{p} is not a {want} module path of that component")
        if component == "unet":
            key = format_key("unet", diffusers_to_ldm(p, layout) if naming == "ldm" else p)
        else:
            key = format_key(te_role[component], p)
        if key in modules:
            raise UnknownFormatError(f"{path}: two modules map to {key}")
        modules[key] = _module(entry, configs.get(component), key, str(path))
    return modules, meta
