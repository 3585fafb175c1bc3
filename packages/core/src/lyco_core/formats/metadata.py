"""Lyco's versioned adapter metadata, and the kohya ``ss_*`` / ``modelspec.*`` keys other tools read.

Everything lives in the safetensors ``__metadata__`` (a str → str map):

* ``lyco.schema_version`` = :data:`SCHEMA_VERSION` and ``lyco.metadata`` = :class:`AdapterMetadata` as JSON.
  That is the only place Lyco reads its own facts from.
* sd-scripts' ``ss_*`` keys, formatted the way ``train_network.py`` formats them (``str(value)``: ``"True"``,
  ``"8.0"``, JSON via ``json.dumps``), so A1111's card filter, alias and hash work, plus ``sshs_model_hash``
  (the payload sha256, see :func:`~lyco_core.formats.safetensors_io.payload_sha256`).
* Stability ModelSpec 1.0.1 ``modelspec.*`` keys, as sd-scripts' ``sai_model_spec.py`` writes them for LoRAs,
  plus ``modelspec.hash_sha256`` (which sd-scripts leaves out).

Reading (:func:`read_metadata`) accepts files with no metadata or only another tool's. A ``lyco.schema_version``
with a newer MAJOR is refused; a newer MINOR is read leniently (unknown fields dropped); an older version is
migrated in memory step by step through :data:`MIGRATIONS`.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import CorruptFileError, InvalidConfigError, LycoError, UnknownFormatError

SCHEMA_VERSION = "1.0"
KEY_SCHEMA_VERSION = "lyco.schema_version"
KEY_METADATA = "lyco.metadata"

Family = Literal["sd1", "sd2", "sdxl", "unknown"]
PredictionType = Literal["epsilon", "v"]

#: ModelSpec architecture ids (without the ``/lora`` suffix) and ``modelspec.implementation`` values.
ARCH_SD1 = "stable-diffusion-v1"
ARCH_SD2_512 = "stable-diffusion-v2-512"
ARCH_SD2_768_V = "stable-diffusion-v2-768-v"
ARCH_SDXL = "stable-diffusion-xl-v1-base"
IMPL_DIFFUSERS = "diffusers"
IMPL_SAI = "https://github.com/Stability-AI/generative-models"
MODELSPEC_VERSION = "1.0.1"


def _lyco_version() -> str:
    try:
        return importlib.metadata.version("lyco-core")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        return "0+unknown"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------- schema
class _Frozen(BaseModel):
    """Frozen, extra="forbid"; validated with ``context={"lenient": True}`` unknown fields are dropped instead
    (used to read files written by a newer MINOR schema version)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get("lenient"):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class ModuleSummary(_Frozen):
    """One adapter module: algorithm, rank, α, the shape of its ΔW, the DoRA axis and algorithm extras."""

    algo: str = Field(description="canonical algorithm name (lyco_core.algorithms.names())")
    rank: int | None = Field(None, ge=1, description="rank r the scale divides by; None when the algorithm has none")
    alpha: float | None = Field(None, description="stored α; None when the module stores none")
    shape: tuple[int, ...] = Field(description="shape of ΔW (= the base layer's weight shape)")
    dora: Literal["output", "input"] | None = Field(None, description="DoRA magnitude axis, None without DoRA")
    extra: dict[str, Any] = Field(default_factory=dict, description="other describe() facts, e.g. tucker")

    @classmethod
    def from_describe(cls, desc: Mapping[str, Any], shape: tuple[int, ...] | list[int]) -> ModuleSummary:
        """Build from :meth:`Algorithm.describe` output (algo/rank/alpha/dora; the rest goes to ``extra``)."""
        known = {"algo", "rank", "alpha", "dora"}
        return cls(
            algo=str(desc["algo"]),
            rank=desc.get("rank"),
            alpha=desc.get("alpha"),
            dora=desc.get("dora"),
            shape=tuple(shape),
            extra={k: v for k, v in desc.items() if k not in known},
        )

    @property
    def is_plain_lora(self) -> bool:
        """What kohya's ``networks.lora`` can also load: LoRA/LoCon without Tucker core or DoRA."""
        return self.algo == "lora" and self.dora is None and not self.extra.get("tucker")


class BaseModelInfo(_Frozen):
    """The base model the adapter was made for."""

    family: Family = "unknown"
    architecture: str | None = Field(None, description="ModelSpec id, e.g. 'stable-diffusion-v1' (no /lora)")
    prediction_type: PredictionType | None = Field(None, description="None is written as epsilon")
    model_name: str | None = None
    model_hash: str | None = Field(None, description="sha256 (64 hex) or A1111 old hash (8 hex) of the base")


class TrainingInfo(_Frozen):
    """What training produced the adapter. Each field is optional; the ``ss_*`` key it fills is noted."""

    steps: int | None = Field(None, description="ss_steps: optimiser steps done")
    epochs: int | None = Field(None, description="ss_epoch: epochs done")
    max_train_steps: int | None = Field(None, description="ss_max_train_steps")
    num_epochs: int | None = Field(None, description="ss_num_epochs: epochs planned")
    learning_rate: float | None = Field(None, description="ss_learning_rate")
    unet_lr: float | None = Field(None, description="ss_unet_lr")
    text_encoder_lr: float | None = Field(None, description="ss_text_encoder_lr")
    lr_scheduler: str | None = Field(None, description="ss_lr_scheduler")
    lr_warmup_steps: int | None = Field(None, description="ss_lr_warmup_steps")
    optimizer: str | None = Field(None, description="ss_optimizer, e.g. 'torch.optim.AdamW(weight_decay=0.01)'")
    seed: int | None = Field(None, description="ss_seed")
    batch_size: int | None = Field(None, description="ss_batch_size_per_device")
    gradient_accumulation_steps: int | None = Field(None, description="ss_gradient_accumulation_steps")
    num_train_images: int | None = Field(None, description="ss_num_train_images (repeats included)")
    num_reg_images: int | None = Field(None, description="ss_num_reg_images")
    resolution: tuple[int, int] | None = Field(None, description="ss_resolution, (width, height)")
    clip_skip: int | None = Field(None, description="ss_clip_skip and modelspec.encoder_layer")
    mixed_precision: str | None = Field(None, description="ss_mixed_precision: no / fp16 / bf16")
    noise_offset: float | None = Field(None, description="ss_noise_offset")
    min_snr_gamma: float | None = Field(None, description="ss_min_snr_gamma")
    started_at: float | None = Field(None, description="ss_training_started_at (unix time)")
    finished_at: float | None = Field(None, description="ss_training_finished_at (unix time)")
    comment: str | None = Field(None, description="ss_training_comment")
    tag_frequency: dict[str, dict[str, int]] = Field(default_factory=dict, description="ss_tag_frequency")
    dataset_dirs: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="ss_dataset_dirs: {dir: {n_repeats, img_count}}"
    )
    dataset: dict[str, Any] = Field(default_factory=dict, description="dataset summary (Lyco only)")
    extra: dict[str, Any] = Field(default_factory=dict, description="anything else (Lyco only)")


class NetworkInfo(_Frozen):
    """Network-wide settings: defaults and the options the network was created with (``ss_network_args``)."""

    algo: str = "lora"
    dim: int | None = Field(None, ge=1, description="default rank")
    alpha: float | None = Field(None, description="default α")
    preset: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class AdapterMetadata(_Frozen):
    """Everything Lyco records about an adapter file (stored as JSON under ``lyco.metadata``)."""

    schema_version: str = SCHEMA_VERSION
    created_by: str = Field(default_factory=lambda: f"lyco-core {_lyco_version()}")
    created_at: str = Field(default_factory=_utc_now, description="ISO 8601, UTC")
    algorithms: dict[str, int] = Field(default_factory=dict, description="algorithm → module count")
    modules: dict[str, ModuleSummary] = Field(default_factory=dict)
    base: BaseModelInfo = Field(default_factory=BaseModelInfo)
    training: TrainingInfo | None = None
    network: NetworkInfo = Field(default_factory=NetworkInfo)
    output_name: str | None = Field(None, description="ss_output_name (A1111 alias)")
    title: str | None = None
    description: str | None = None
    trigger_phrase: str | None = None

    @field_validator("created_at")
    @classmethod
    def _utc_iso(cls, v: str) -> str:
        try:
            t = datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith("Z") else v)
        except ValueError:
            raise ValueError(f"not an ISO 8601 date-time: {v!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=UTC)
        return t.astimezone(UTC).isoformat(timespec="seconds")

    @model_validator(mode="before")
    @classmethod
    def _count_algorithms(cls, data: Any) -> Any:
        """``algorithms`` defaults to the counts over ``modules``."""
        if isinstance(data, dict) and not data.get("algorithms") and data.get("modules"):
            counts: dict[str, int] = {}
            for m in data["modules"].values():
                algo = m.algo if isinstance(m, ModuleSummary) else m.get("algo") if isinstance(m, dict) else None
                if isinstance(algo, str):
                    counts[algo] = counts.get(algo, 0) + 1
            data = {**data, "algorithms": counts}
        return data


# --------------------------------------------------------------------------------------------- writing
def _fmt(v: Any) -> str:
    """A value as sd-scripts writes it: ``str(v)``, JSON (``json.dumps``) for dicts and lists."""
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def _family_from_arch(arch: str | None) -> Family:
    a = (arch or "").split("/")[0]
    if a.startswith("stable-diffusion-xl"):
        return "sdxl"
    if a.startswith("stable-diffusion-v2"):
        return "sd2"
    if a.startswith("stable-diffusion-v1"):
        return "sd1"
    return "unknown"


def _uniform(values: list[Any], fallback: Any) -> str:
    """The shared value as str, ``"Dynamic"`` when modules disagree, ``fallback`` when none has one."""
    distinct = set(values)
    if len(distinct) > 1:
        return "Dynamic"
    return str(next(iter(distinct)) if distinct else fallback)


_SS_TRAINING: dict[str, str] = {
    "steps": "ss_steps",
    "epochs": "ss_epoch",
    "max_train_steps": "ss_max_train_steps",
    "num_epochs": "ss_num_epochs",
    "learning_rate": "ss_learning_rate",
    "unet_lr": "ss_unet_lr",
    "text_encoder_lr": "ss_text_encoder_lr",
    "lr_scheduler": "ss_lr_scheduler",
    "lr_warmup_steps": "ss_lr_warmup_steps",
    "optimizer": "ss_optimizer",
    "seed": "ss_seed",
    "batch_size": "ss_batch_size_per_device",
    "gradient_accumulation_steps": "ss_gradient_accumulation_steps",
    "num_train_images": "ss_num_train_images",
    "num_reg_images": "ss_num_reg_images",
    "resolution": "ss_resolution",
    "clip_skip": "ss_clip_skip",
    "mixed_precision": "ss_mixed_precision",
    "noise_offset": "ss_noise_offset",
    "min_snr_gamma": "ss_min_snr_gamma",
    "started_at": "ss_training_started_at",
    "finished_at": "ss_training_finished_at",
    "comment": "ss_training_comment",
    "tag_frequency": "ss_tag_frequency",
    "dataset_dirs": "ss_dataset_dirs",
}


def _kohya_keys(meta: AdapterMetadata, family: Family, v_pred: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    if family != "unknown":
        out["ss_v2"] = str(family == "sd2")
        if family == "sdxl":
            out["ss_base_model_version"] = "sdxl_base_v1-0"
        else:
            out["ss_base_model_version"] = ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_pred else "")
    mods = list(meta.modules.values())
    plain = bool(mods) and all(m.is_plain_lora for m in mods)
    out["ss_network_module"] = "networks.lora" if plain else "lycoris.kohya"
    net = meta.network
    out["ss_network_dim"] = _uniform([m.rank for m in mods if m.rank is not None], net.dim)
    alpha_default = None if net.alpha is None else float(net.alpha)
    out["ss_network_alpha"] = _uniform([float(m.alpha) for m in mods if m.alpha is not None], alpha_default)
    args: dict[str, str] = {"algo": net.algo}
    if net.preset is not None:
        args["preset"] = net.preset
    args.update({str(k): _fmt(v) for k, v in net.options.items()})
    out["ss_network_args"] = json.dumps(args)
    if meta.output_name:
        out["ss_output_name"] = meta.output_name
    base = meta.base
    if base.model_name:
        out["ss_sd_model_name"] = base.model_name
    if base.model_hash and re.fullmatch(r"[0-9a-fA-F]{64}", base.model_hash):
        out["ss_new_sd_model_hash"] = base.model_hash.lower()
    elif base.model_hash and re.fullmatch(r"[0-9a-fA-F]{8}", base.model_hash):
        out["ss_sd_model_hash"] = base.model_hash.lower()
    if meta.training is not None:
        for name, key in _SS_TRAINING.items():
            v = getattr(meta.training, name)
            if v is not None and v != {}:
                out[key] = _fmt(v)
    return out


def _modelspec_keys(meta: AdapterMetadata, family: Family, v_pred: bool, payload: str) -> dict[str, str]:
    if meta.base.architecture:
        arch = meta.base.architecture
    elif family == "sdxl":
        arch = ARCH_SDXL
    elif family == "sd2":
        arch = ARCH_SD2_768_V if v_pred else ARCH_SD2_512
    elif family == "sd1":
        arch = ARCH_SD1
    else:
        return {}  # ModelSpec requires an architecture; without one no modelspec.* keys are written
    if meta.training is not None and meta.training.resolution is not None:
        w, h = meta.training.resolution
    else:
        w = h = 1024 if family == "sdxl" else 768 if arch.startswith(ARCH_SD2_768_V) else 512
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": arch if "/" in arch else f"{arch}/lora",
        "modelspec.implementation": IMPL_SAI if family == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": meta.title or meta.output_name or f"{meta.network.algo}@{meta.created_at}",
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": meta.created_at,
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.hash_sha256": "0x" + payload,
    }
    if meta.training is not None and meta.training.clip_skip is not None:
        out["modelspec.encoder_layer"] = str(meta.training.clip_skip)
    if meta.description:
        out["modelspec.description"] = meta.description
    if meta.trigger_phrase:
        out["modelspec.trigger_phrase"] = meta.trigger_phrase
    return out


def to_header(meta: AdapterMetadata, payload_sha256: str) -> dict[str, str]:
    """The ``__metadata__`` for an adapter file: ``lyco.*``, kohya ``ss_*``/``sshs_model_hash``, ``modelspec.*``.

    ``payload_sha256`` is the data-section hash (:func:`payload_sha256_of` of the tensors about to be written;
    64 hex digits, an optional ``0x`` is dropped). Values follow sd-scripts exactly: ``ss_v2`` ``"True"``/
    ``"False"``; ``ss_base_model_version`` ``sd_v1``/``sd_v1_v``/``sd_v2``/``sd_v2_v``/``sdxl_base_v1-0``;
    ``ss_network_module`` ``networks.lora`` when every module is LoRA without Tucker/DoRA, else
    ``lycoris.kohya``; ``ss_network_dim``/``ss_network_alpha`` the value all modules share, ``"Dynamic"``
    when they differ, the network default (or ``"None"``) when no module has one; ``ss_network_args`` JSON
    of strings with ``algo``. A family of ``unknown`` (and no architecture) writes no base-model keys and
    no ``modelspec.*``. The metadata is stored with ``schema_version`` = :data:`SCHEMA_VERSION`.
    """
    digest = payload_sha256.lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise InvalidConfigError(f"payload_sha256: expected 64 hex digits, got {payload_sha256!r}")
    if meta.schema_version != SCHEMA_VERSION:
        meta = meta.model_copy(update={"schema_version": SCHEMA_VERSION})
    family = meta.base.family if meta.base.family != "unknown" else _family_from_arch(meta.base.architecture)
    v_pred = meta.base.prediction_type == "v" or (
        meta.base.prediction_type is None and (meta.base.architecture or "").startswith(ARCH_SD2_768_V)
    )
    header = {KEY_SCHEMA_VERSION: SCHEMA_VERSION, KEY_METADATA: meta.model_dump_json(exclude_none=True)}
    header.update(_kohya_keys(meta, family, v_pred))
    header["sshs_model_hash"] = digest
    header.update(_modelspec_keys(meta, family, v_pred, digest))
    return header


# --------------------------------------------------------------------------------------------- reading
def _migrate_0_9(doc: dict[str, Any]) -> dict[str, Any]:
    """0.9 kept the base model's family and a ``v_prediction`` flag at the top level; 1.0 nests them in ``base``."""
    doc = dict(doc)
    base = dict(doc.get("base") or {})
    if "family" in doc:
        base["family"] = doc.pop("family")
    if "v_prediction" in doc:
        v = doc.pop("v_prediction")
        base["prediction_type"] = None if v is None else ("v" if v else "epsilon")
    doc["base"] = base
    return doc


#: version → (next version, function rewriting the JSON document). Applied in a chain up to SCHEMA_VERSION.
MIGRATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "0.9": ("1.0", _migrate_0_9),
}


@dataclass(frozen=True)
class ReadMetadata:
    """A file's ``__metadata__`` split by owner.

    ``lyco`` is the (migrated) Lyco metadata or None; ``kohya`` holds ``ss_*`` and ``sshs_*``; ``modelspec``
    holds ``modelspec.*``; ``other`` everything else (diffusers ``lora_adapter_metadata``, ai-toolkit
    ``software``, ``ssmd_*``, …). ``stored_schema_version`` is the version the file declared.
    """

    lyco: AdapterMetadata | None = None
    kohya: dict[str, str] = field(default_factory=dict)
    modelspec: dict[str, str] = field(default_factory=dict)
    other: dict[str, str] = field(default_factory=dict)
    stored_schema_version: str | None = None


def _parse_version(v: str, where: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", v)
    if m is None:
        raise CorruptFileError(f"{where}{KEY_SCHEMA_VERSION}: {v!r} is not MAJOR.MINOR")
    return int(m[1]), int(m[2])


def _one_line(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors())


def _read_lyco(header: Mapping[str, str], where: str) -> tuple[AdapterMetadata | None, str | None]:
    raw = header.get(KEY_METADATA)
    declared = header.get(KEY_SCHEMA_VERSION)
    if raw is None:
        if declared is not None:
            raise CorruptFileError(f"{where}{KEY_SCHEMA_VERSION} is set but {KEY_METADATA} is missing")
        return None, None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CorruptFileError(f"{where}{KEY_METADATA}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CorruptFileError(f"{where}{KEY_METADATA}: a JSON {type(doc).__name__}, not an object")
    inner = doc.get("schema_version")
    if declared is not None and inner is not None and inner != declared:
        raise CorruptFileError(f"{where}{KEY_SCHEMA_VERSION} is {declared!r} but {KEY_METADATA} says {inner!r}")
    version = declared if declared is not None else inner
    if not isinstance(version, str):
        raise CorruptFileError(f"{where}{KEY_METADATA}: no schema_version")
    found, current = _parse_version(version, where), _parse_version(SCHEMA_VERSION, "")
    if found[0] > current[0]:
        raise UnknownFormatError(
            f"{where}{KEY_SCHEMA_VERSION}: written by a newer Lyco (schema {version} > {SCHEMA_VERSION}); "
            "upgrade lyco-core"
        )
    lenient = found > current  # same major, newer minor: keep what this version understands
    step = version
    while _parse_version(step, where) < current:
        if step not in MIGRATIONS:
            raise UnknownFormatError(
                f"{where}{KEY_SCHEMA_VERSION}: schema {version} is older than any this Lyco can migrate "
                f"(oldest {min(MIGRATIONS, key=lambda s: _parse_version(s, ''))})"
            )
        step, migrate = MIGRATIONS[step]
        doc = {**migrate(doc), "schema_version": step}
    doc = {**doc, "schema_version": step}
    try:
        meta = AdapterMetadata.model_validate(doc, context={"lenient": lenient})
    except ValidationError as e:
        raise CorruptFileError(f"{where}{KEY_METADATA}: does not match schema {version} ({_one_line(e)})") from None
    return meta, version


def read_metadata(header: Mapping[str, str], *, source: str | None = None) -> ReadMetadata:
    """Split a ``__metadata__`` dict by owner and parse (and migrate) Lyco's part.

    ``source`` (a file name) prefixes error messages. Raises :class:`UnknownFormatError` for a newer major
    schema and :class:`CorruptFileError` (naming the key) for invalid ``lyco.*`` values; other tools' keys
    are never interpreted here, so files without Lyco metadata always read.
    """
    where = f"{source}: " if source else ""
    lyco, version = _read_lyco(header, where)
    kohya: dict[str, str] = {}
    modelspec: dict[str, str] = {}
    other: dict[str, str] = {}
    for k, v in header.items():
        if k.startswith(("ss_", "sshs_")):
            kohya[k] = v
        elif k.startswith("modelspec."):
            modelspec[k] = v
        elif not k.startswith("lyco."):
            other[k] = v
    return ReadMetadata(lyco=lyco, kohya=kohya, modelspec=modelspec, other=other, stored_schema_version=version)


def module_shapes(header: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
    """Module key → ΔW shape recorded in a file's Lyco metadata (empty when it has none or it does not parse)."""
    try:
        lyco = read_metadata(header).lyco
    except LycoError:
        return {}
    if lyco is None:
        return {}
    return {k: tuple(s.shape) for k, s in lyco.modules.items() if s.shape}


def family_from_header(header: Mapping[str, str]) -> tuple[Family, list[str]]:
    """The base-model family other tools' keys claim, and the evidence (one line per key read).

    Priority: ``ss_base_model_version``, then ``modelspec.architecture``, then ``ss_v2`` (``"True"`` → sd2;
    ``"False"`` alone → sd1, as in sd-scripts files older than ``ss_base_model_version``; SDXL files always
    carry ``ss_base_model_version``). Disagreements are listed in the evidence; the first source wins.
    """
    claims: list[tuple[str, Family]] = []
    evidence: list[str] = []
    bmv = header.get("ss_base_model_version")
    if bmv is not None:
        fam: Family = (
            "sdxl"
            if bmv.startswith("sdxl_")
            else "sd2"
            if bmv.startswith("sd_v2")
            else "sd1"
            if bmv.startswith("sd_v1")
            else "unknown"
        )
        claims.append(("ss_base_model_version", fam))
        evidence.append(f"ss_base_model_version={bmv!r} → {fam}")
    arch = header.get("modelspec.architecture")
    if arch is not None:
        fam = _family_from_arch(arch)
        claims.append(("modelspec.architecture", fam))
        evidence.append(f"modelspec.architecture={arch!r} → {fam}")
    v2 = header.get("ss_v2")
    if v2 is not None:
        fam = "sd2" if v2 == "True" else "sd1" if v2 == "False" else "unknown"
        # ss_v2="False" only says "not SD2": it cannot overrule a more specific key
        if v2 == "True" or not claims:
            claims.append(("ss_v2", fam))
        used = claims and claims[-1][0] == "ss_v2"
        evidence.append(f"ss_v2={v2!r} → {fam if used else 'not sd2'}")
    known = [(k, f) for k, f in claims if f != "unknown"]
    if not known:
        return "unknown", evidence
    winner = known[0][1]
    for k, f in known[1:]:
        if f != winner:
            evidence.append(f"conflict: {k} says {f}, {known[0][0]} says {winner}; using {winner}")
    return winner, evidence


__all__ = [
    "KEY_METADATA",
    "KEY_SCHEMA_VERSION",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AdapterMetadata",
    "BaseModelInfo",
    "Family",
    "ModuleSummary",
    "NetworkInfo",
    "PredictionType",
    "ReadMetadata",
    "TrainingInfo",
    "family_from_header",
    "module_shapes",
    "read_metadata",
    "to_header",
]
