"""`lyco adapter bake BASE ADAPTER [ADAPTER…] -o OUT [--multiplier M…]`."""

from __future__ import annotations

import argparse

from ...ops.bake import bake
from .common import add_output, print_report


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "bake",
        help="merge adapters into a base model (diffusers folder, state dict or LDM checkpoint)",
        description="Write BASE with the adapters merged into its weights. OUT keeps BASE's layout, naming and "
        "dtype: a diffusers folder gives a folder (weights rewritten, every other file copied), a .safetensors "
        "state dict or LDM single file gives a .safetensors file (a .ckpt base is read with "
        "torch.load(weights_only=True) and written as .safetensors). Adapters are applied in the order given. "
        "Every algorithm merges with its exact rule (DoRA, OFT/BOFT, (IA)³ included). The base is streamed one "
        "layer at a time, so memory stays low for SDXL-size models.",
    )
    p.add_argument(
        "base", metavar="BASE", help="diffusers folder, diffusers-named .safetensors, or LDM .safetensors/.ckpt"
    )
    p.add_argument("adapters", metavar="ADAPTER", nargs="+", help="adapter file(s) (kohya/LyCORIS .safetensors)")
    p.add_argument(
        "-m",
        "--multiplier",
        type=float,
        nargs="+",
        metavar="M",
        help="strength per adapter, or one value for all (default 1.0)",
    )
    p.add_argument(
        "--skip-unmatched",
        action="store_true",
        help="bake the modules that fit and list the others, instead of refusing a file that does not fully fit",
    )
    add_output(p, "output folder (diffusers BASE) or .safetensors file")
    p.set_defaults(func=cmd_bake)


def cmd_bake(args: argparse.Namespace) -> int:
    report = bake(
        args.base,
        args.adapters,
        args.output,
        multipliers=args.multiplier,
        skip_unmatched=args.skip_unmatched,
        overwrite=args.force,
    )
    print_report(report, args.json)
    return 0
