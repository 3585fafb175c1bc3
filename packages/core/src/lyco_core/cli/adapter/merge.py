"""`lyco adapter merge A B … -o OUT [--weights w…] [--rank R] [--conv-rank R] [--base BASE] …`."""

from __future__ import annotations

import argparse

from ...ops.lowrank import METHODS
from ...ops.merge import merge_adapters
from .common import add_dtype, add_output, dtype_of, print_report


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "merge",
        help="one adapter whose effect is the weighted sum of several adapters",
        description="Merge adapters into one whose effect equals Σ wᵢ·ΔWᵢ (ΔWᵢ: adapter i's weight change at "
        "strength 1). Without --rank the result is exact: LoRA factors are concatenated (Tucker cores placed "
        "block-diagonally), (IA)³/Full/Norm tensors add up, a module in only one file is scaled, and sums no "
        "algorithm can express (LoHa+LoHa, LoKr, mixed algorithms) become full 'diff' modules. With --rank every "
        "module is re-extracted by SVD as a LoRA and its relative error is reported. DoRA, OFT/BOFT and GLoRA "
        "modules (and (IA)³ mixed with others) need --base or --drop-unsupported. Keys are matched as written: "
        "convert files to the same naming first. This is not sd-scripts' merge_lora.py, which squares the "
        "ratios.",
    )
    p.add_argument("files", nargs="+", metavar="ADAPTER", help="adapter files (.safetensors), two or more")
    add_output(p)
    p.add_argument(
        "--weights", type=float, nargs="+", metavar="W",
        help="one weight per adapter, in order (default 1.0 each); negative weights subtract",
    )
    p.add_argument(
        "--rank", type=int, metavar="R",
        help="re-extract every module as a LoRA of rank ≤ R by SVD of the merged ΔW (default: exact merge)",
    )
    p.add_argument(
        "--conv-rank", type=int, metavar="R",
        help="with --rank: rank for convs with a kernel larger than 1×1 (default: --rank)",
    )
    p.add_argument(
        "--method", choices=METHODS, default="auto",
        help="with --rank: SVD of dense sums (full, randomized, or auto: randomized where it is faster; "
        "LoRA-only modules always use their factors)",
    )
    p.add_argument(
        "--base", metavar="BASE",
        help="base model (diffusers folder, diffusers state dict or LDM single file) for base-dependent modules "
        "(DoRA, OFT/BOFT, GLoRA, mixed (IA)³): they become exact full diffs for this base",
    )
    p.add_argument(
        "--drop-unsupported", action="store_true",
        help="drop modules that cannot be merged without --base, and (with --rank) bias changes a LoRA cannot "
        "hold, listing them in the report, instead of failing",
    )
    add_dtype(p)
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    report = merge_adapters(
        args.files,
        args.output,
        weights=args.weights,
        rank=args.rank,
        conv_rank=args.conv_rank,
        base=args.base,
        dtype=dtype_of(args.dtype),
        method=args.method,
        allow_drop=args.drop_unsupported,
        overwrite=args.force,
    )
    print_report(report, args.json)
    return 0
