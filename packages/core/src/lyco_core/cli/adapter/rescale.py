"""`lyco adapter rescale FILE -o OUT (--multiplier M | --alpha A) [--base BASE] [--dtype] [--force] [--json]`."""

from __future__ import annotations

import argparse
from collections import Counter

from ...ops.rescale import rescale_adapter
from .common import add_dtype, add_output, dtype_of, print_report


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "rescale",
        help="fold a strength multiplier into an adapter file, or change its alpha keeping the weight change",
        description="With --multiplier M, write OUT such that loading OUT at strength 1 equals loading FILE at "
        "strength M, in every consumer: one factor of each module is multiplied by M (never alpha, which "
        "consumers read differently when it is 0 or missing). Exact for LoRA/LoCon/DyLoRA, LoHa, LoKr, GLoRA, "
        "(IA)3, Full and Norm. DoRA and OFT/BOFT modules are not linear in the multiplier: they need --base and "
        "are then written as exact full weight differences for that base. With --alpha A, every module with a "
        "LoRA-style alpha stores A instead and its factor is rescaled so that the weight change stays the same; "
        "modules without one are left as they are (see the report).",
    )
    p.add_argument("file", metavar="FILE", help="adapter file (.safetensors, kohya/LyCORIS keys)")
    add_output(p, "rescaled adapter file to write (.safetensors)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--multiplier",
        type=float,
        metavar="M",
        help="strength to fold in: OUT at 1 equals FILE at M (negative values invert the effect, 0 removes it)",
    )
    how.add_argument(
        "--alpha",
        type=float,
        metavar="A",
        help="new stored alpha (> 0; the scale consumers use is alpha/rank); the weight change is unchanged",
    )
    p.add_argument(
        "--base",
        metavar="BASE",
        help="base model the file is used with (diffusers folder, diffusers-named state dict or LDM single "
        "file); needed only with --multiplier when FILE has DoRA or OFT/BOFT modules",
    )
    add_dtype(p)
    p.set_defaults(func=cmd_rescale)


def cmd_rescale(args: argparse.Namespace) -> int:
    report = rescale_adapter(
        args.file,
        args.output,
        multiplier=args.multiplier,
        alpha=args.alpha,
        base=args.base,  # a path, opened with lyco_core.checkpoint.open_base
        dtype=dtype_of(args.dtype),
        overwrite=args.force,
    )
    print_report(report, args.json)
    if not args.json:  # what was done, grouped: "  lora_up.weight ×0.5: 291 module(s)"
        notes = Counter(m.note for m in report.modules.values() if m.note)
        print("\n".join(f"  {note}: {n} module(s)" for note, n in sorted(notes.items())))
    return 0
