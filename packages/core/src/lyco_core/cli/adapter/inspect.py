"""`lyco adapter inspect FILE [--json] [--modules]` (a thin layer over :mod:`lyco_core.ops.inspect`)."""

from __future__ import annotations

import argparse
import json

from ...ops.inspect import inspect_adapter, summary_lines


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ins = cmds.add_parser(
        "inspect",
        help="algorithms, modules, ranks, base family, size, metadata and payload hash of an adapter file",
        description="Print what an adapter file holds: algorithms and module counts per algorithm and per model "
        "component (unet/te/te1/te2), ranks and alphas, parameter count, dtypes, size, the base family it fits "
        "(sd1/sd2/sdxl/unknown) with the evidence (cross-attention width, key naming, metadata), the metadata "
        "(Lyco schema, ss_*, modelspec.*) and the payload sha256 (checked against sshs_model_hash and "
        "modelspec.hash_sha256). Reads the file only; no base model is needed.",
    )
    ins.add_argument("file", help="adapter file (.safetensors, kohya/LyCORIS keys)")
    ins.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object instead of text (keys include schema_version, algorithms, roles, modules, "
        "base_family, rank_histogram, dtypes, payload_sha256, hash_matches, metadata, metadata_split)",
    )
    ins.add_argument("--modules", action="store_true", help="text output: also list every module with its rank")
    ins.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.file)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print("\n".join(summary_lines(info, modules=getattr(args, "modules", False))))
    return 0
