"""`lyco adapter inspect FILE [--json]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ...files import read_adapter


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ins = cmds.add_parser(
        "inspect",
        help="algorithms, modules, ranks, size, metadata and payload hash of an adapter file",
        description="Print what an adapter file holds: algorithms and module counts, ranks, parameter count, "
        "dtypes, size, metadata (Lyco schema, ss_*, modelspec.*) and the payload sha256.",
    )
    ins.add_argument("file", help="adapter file (.safetensors)")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ins.set_defaults(func=cmd_inspect)


def inspect_adapter(path: str) -> dict[str, Any]:
    """The facts `lyco adapter inspect` prints, as one JSON-able dict."""
    from ...formats.metadata import read_metadata
    from ...formats.safetensors_io import payload_sha256

    f = read_adapter(path)
    meta = read_metadata(f.header)
    params = sum(t.numel() for m in f.modules.values() for t in m.tensors.values())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for m in f.modules.values() for t in m.tensors.values()})
    ranks = sorted({int(r) for m in f.modules.values() if isinstance(r := m.describe().get("rank"), int)})
    return {
        "file": str(path),
        "schema_version": meta.lyco.schema_version if meta.lyco else None,
        "algorithms": f.algorithms(),
        "modules": {k: m.describe() for k, m in sorted(f.modules.items())},
        "module_count": len(f.modules),
        "ranks": ranks,
        "parameters": params,
        "dtypes": dtypes,
        "size_bytes": f.path.stat().st_size if f.path else None,
        "unknown_tensors": f.unknown_tensors,
        "payload_sha256": payload_sha256(path),
        "metadata": f.header,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_adapter(args.file)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"file        {info['file']}  ({info['size_bytes']:,} bytes)")
    print(f"schema      {info['schema_version'] or '(no Lyco metadata)'}")
    print("algorithms  " + ", ".join(f"{k}: {v}" for k, v in info["algorithms"].items()))
    print(f"modules     {info['module_count']}   ranks {info['ranks']}   parameters {info['parameters']:,}")
    print(f"dtypes      {', '.join(info['dtypes'])}")
    print(f"payload     sha256 {info['payload_sha256']}")
    if info["unknown_tensors"]:
        print(f"unknown     {len(info['unknown_tensors'])} tensor(s) no algorithm uses: {info['unknown_tensors'][:5]}")
    for k, v in sorted(info["metadata"].items()):
        if k != "lyco.metadata":
            print(f"  {k} = {v if len(v) < 100 else v[:97] + '...'}")
    return 0
