"""What an adapter file holds: ``lyco adapter inspect`` and the REST service's file summary.

:func:`inspect_adapter` returns one JSON-able dict; :func:`summary_lines` renders it as the CLI's text output.
Reading validates the file (every module's tensors must fit each other) but needs no base model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..files import AdapterFile, read_adapter
from ..formats.metadata import read_metadata
from ..formats.safetensors_io import payload_sha256
from .family import adapter_family

#: key prefix → role (the model component a module belongs to), longest prefixes first
ROLE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("oft_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("lycoris_", "lycoris"),
)

#: header keys that hold the payload sha256 (64 hex digits, an optional ``0x``)
HASH_KEYS = ("sshs_model_hash", "modelspec.hash_sha256")

#: the ``ss_*`` / ``modelspec.*`` keys the text output shows (the rest is in ``--json``)
MAIN_KEYS = (
    "ss_output_name",
    "ss_sd_model_name",
    "ss_base_model_version",
    "ss_v2",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_training_comment",
    "ss_steps",
    "ss_epoch",
    "ss_num_train_images",
    "ss_resolution",
    "ss_clip_skip",
    "ss_learning_rate",
    "ss_mixed_precision",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.prediction_type",
    "modelspec.date",
    "modelspec.trigger_phrase",
    "modelspec.description",
)


def module_role(key: str) -> str:
    """``unet``, ``te``, ``te1``, ``te2``, ``lycoris`` (generic ``create_lycoris`` keys) or ``other``."""
    return next((role for prefix, role in ROLE_PREFIXES if key.startswith(prefix)), "other")


def _dtype(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _histogram(values: list[Any]) -> dict[str, int]:
    """value → count, keys as strings (JSON), sorted by value."""
    return {str(v): n for v, n in sorted(Counter(values).items())}


def _hash_matches(header: dict[str, str], digest: str) -> dict[str, bool]:
    return {k: header[k].strip().lower().removeprefix("0x") == digest for k in HASH_KEYS if k in header}


def inspect_file(f: AdapterFile) -> dict[str, Any]:
    """:func:`inspect_adapter` for an already read file (``f.path`` must be set for the size and payload hash)."""
    meta = read_metadata(f.header, source=str(f.path) if f.path else None)
    tensors = [(m, name, t) for m in f.modules.values() for name, t in m.tensors.items()]
    described = {k: m.describe() for k, m in sorted(f.modules.items())}
    ranks = [d["rank"] for d in described.values() if isinstance(d.get("rank"), int)]
    alphas = [d["alpha"] for d in described.values() if isinstance(d.get("alpha"), float)]
    digest = payload_sha256(f.path) if f.path else None
    verdict = adapter_family(f)
    return {
        "file": str(f.path),
        "size_bytes": f.path.stat().st_size if f.path else None,
        "schema_version": meta.lyco.schema_version if meta.lyco else None,
        "stored_schema_version": meta.stored_schema_version,
        "base_family": {
            "family": verdict.family,
            "candidates": verdict.candidates,
            "evidence": verdict.evidence,
            "conflicts": verdict.conflicts,
        },
        "algorithms": f.algorithms(),
        "roles": dict(sorted(Counter(module_role(k) for k in f.modules).items())),
        "module_count": len(f.modules),
        "modules": described,
        "ranks": sorted(set(ranks)),
        "rank_histogram": _histogram(ranks),
        "alpha_histogram": _histogram(alphas),
        "parameters": sum(t.numel() for m, name, t in tensors if name not in m.algorithm.frozen_names),
        "tensor_count": len(tensors) + len(f.unknown_tensors),
        "dtypes": sorted({_dtype(t) for _, _, t in tensors}),
        "dtype_counts": dict(sorted(Counter(_dtype(t) for _, _, t in tensors).items())),
        "unknown_tensors": f.unknown_tensors,
        "payload_sha256": digest,
        "hash_matches": _hash_matches(f.header, digest) if digest else {},
        "metadata": dict(f.header),
        "metadata_split": {
            "lyco": meta.lyco.model_dump(mode="json") if meta.lyco else None,
            "ss": meta.kohya,
            "modelspec": meta.modelspec,
            "other": meta.other,
        },
    }


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Everything ``lyco adapter inspect`` reports about the adapter file at ``path``, as one JSON-able dict.

    Keys: ``file``; ``size_bytes``; ``schema_version`` (Lyco metadata schema after migration, None without Lyco
    metadata) and ``stored_schema_version`` (as written); ``base_family`` ({family, candidates, evidence,
    conflicts}, see :mod:`.family`); ``algorithms`` (name → module count); ``roles`` (unet/te/te1/te2/… → module
    count); ``module_count``; ``modules`` (key → ``describe()``: algo, rank, alpha, variant flags); ``ranks``
    (distinct); ``rank_histogram`` / ``alpha_histogram`` (value as str → module count); ``parameters`` (elements
    of every tensor but alpha/flags); ``tensor_count``; ``dtypes`` and ``dtype_counts`` (tensors per dtype);
    ``unknown_tensors`` (names no algorithm uses); ``payload_sha256`` (sha256 of the data section, = sd-scripts'
    ``sshs_model_hash`` / civitai AutoV3); ``hash_matches`` (``sshs_model_hash`` / ``modelspec.hash_sha256`` →
    whether the stored value equals the payload hash, for the keys present); ``metadata`` (the raw header,
    str → str) and ``metadata_split`` (``lyco``: the parsed Lyco metadata; ``ss``: ``ss_*``/``sshs_*``;
    ``modelspec``: ``modelspec.*``; ``other``).
    """
    return inspect_file(read_adapter(path))


def _short(v: str, width: int = 100) -> str:
    v = v.replace("\n", " ")
    return v if len(v) <= width else v[: width - 3] + "..."


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in d.items()) or "(none)"


def summary_lines(info: dict[str, Any], *, modules: bool = False) -> list[str]:
    """The text ``lyco adapter inspect`` prints for :func:`inspect_adapter`'s ``info``; ``modules`` lists each one."""
    size = info["size_bytes"]
    lines = [f"file        {info['file']}" + (f"  ({size:,} bytes)" if size is not None else "")]
    schema = info["schema_version"]
    stored = info["stored_schema_version"]
    lines.append(
        "schema      "
        + (f"Lyco {schema}" + (f" (stored as {stored}, migrated)" if stored and stored != schema else "")
           if schema else "(no Lyco metadata)")
    )
    fam = info["base_family"]
    maybe = " or ".join(fam["candidates"])
    lines.append(f"family      {fam['family']}" + (f" (could be {maybe})" if fam["family"] == "unknown" and
                                                    len(fam["candidates"]) < 3 else ""))
    lines += [f"  evidence  {e}" for e in fam["evidence"]]
    lines += [f"  conflict  {c}" for c in fam["conflicts"]]
    lines.append(f"algorithms  {_counts(info['algorithms'])}")
    lines.append(f"roles       {_counts(info['roles'])}")
    lines.append(f"modules     {info['module_count']}   parameters {info['parameters']:,}   "
                 f"tensors {info['tensor_count']}")
    if info["rank_histogram"]:
        lines.append("ranks       " + ", ".join(f"{r} ×{n}" for r, n in info["rank_histogram"].items()))
    if info["alpha_histogram"]:
        lines.append("alphas      " + ", ".join(f"{a} ×{n}" for a, n in info["alpha_histogram"].items()))
    lines.append("dtypes      " + ", ".join(f"{d} ({n} tensors)" for d, n in info["dtype_counts"].items()))
    matches = info["hash_matches"]
    if not matches:
        check = "(no stored hash to compare)"
    elif all(matches.values()):
        check = f"(matches {', '.join(matches)})"
    else:
        bad = [k for k, ok in matches.items() if not ok]
        check = f"(DIFFERS from stored {', '.join(bad)}: {_short(info['metadata'][bad[0]], 70)})"
    lines.append(f"payload     sha256 {info['payload_sha256']}  {check}")
    if info["unknown_tensors"]:
        lines.append(f"unknown     {len(info['unknown_tensors'])} tensor(s) no algorithm uses: "
                     f"{info['unknown_tensors'][:5]}")
    lyco = info["metadata_split"]["lyco"]
    if lyco:
        net = lyco.get("network") or {}
        lines.append(f"lyco        created by {lyco.get('created_by')} at {lyco.get('created_at')}; network "
                     f"algo={net.get('algo')} dim={net.get('dim')} alpha={net.get('alpha')} preset={net.get('preset')}")
        comment = (lyco.get("training") or {}).get("comment")
        if comment:
            lines.append(f"  comment   {_short(comment)}")
    header: dict[str, str] = info["metadata"]
    shown = [k for k in MAIN_KEYS if k in header]
    if shown:
        lines.append("metadata")
        lines += [f"  {k} = {_short(header[k])}" for k in shown]
    rest = [k for k in header if k not in shown and not k.startswith("lyco.") and k not in HASH_KEYS]
    if rest:
        lines.append(f"  … {len(rest)} more key(s): {_short(', '.join(sorted(rest)), 200)} (see --json)")
    if modules:
        lines.append("module list")
        for key, d in info["modules"].items():
            extra = " ".join(f"{k}={v}" for k, v in d.items() if k != "algo")
            lines.append(f"  {key}  {d['algo']}" + (f"  {extra}" if extra else ""))
    return lines


__all__ = ["inspect_adapter", "inspect_file", "module_role", "summary_lines"]
