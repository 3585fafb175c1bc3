"""`lyco adapter check FILE --base BASE [--json]`."""

from __future__ import annotations

import argparse
import json

from ...ops.check import check_adapter


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "check",
        help="does an adapter fit a base model: modules that load, keys that match nothing, shape mismatches",
        description="Check FILE against BASE without loading any model: which modules load, which keys match no "
        "layer, shape mismatches, and the family verdict (SD 1.x / 2.x / SDXL) of both with the evidence. "
        "Exit status 0 when every module loads, 1 (with the reason) when the file does not fit.",
    )
    p.add_argument("file", metavar="FILE", help="adapter file (.safetensors)")
    p.add_argument("--base", required=True, help="diffusers folder, diffusers-named .safetensors, or LDM checkpoint")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    report = check_adapter(args.file, args.base)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0 if report.fits else 1
