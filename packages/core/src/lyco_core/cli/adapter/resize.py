"""`lyco adapter resize FILE -o OUT (--rank R | --dynamic MODE --param P) [--conv-rank R] [--base BASE] …`."""

from __future__ import annotations

import argparse

from ...ops.lowrank import METHODS
from ...ops.resize import DYNAMIC_MODES, resize_adapter
from .common import add_dtype, add_output, dtype_of, print_report


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "resize",
        help="re-rank an adapter by SVD; every module becomes LoRA/LoCon",
        description="Re-rank every module of an adapter to a LoRA/LoCon by SVD of its exact weight change ΔW. "
        "LoRA modules are resized through their factors (ΔW is never built); LoHa, LoKr and Full modules are "
        "converted. DoRA, (IA)³, OFT/BOFT and GLoRA modules change the weights in a way that depends on the "
        "base model: they need --base (the result then reproduces their effect on that base) or "
        "--drop-unsupported. Output modules store alpha = rank (scale 1). The report gives each module's rank "
        "and relative error ‖ΔW_new − ΔW‖/‖ΔW‖.",
    )
    p.add_argument("file", help="adapter file to resize (.safetensors, kohya/LyCORIS keys)")
    add_output(p)
    p.add_argument(
        "--rank", type=int, metavar="R",
        help="new rank (a module already below R keeps its rank); with --dynamic, the largest rank allowed",
    )
    p.add_argument(
        "--dynamic", choices=DYNAMIC_MODES, metavar="MODE",
        help="choose each module's rank from its singular values σ (needs --param P): sv_ratio keeps σ ≥ σ_max/P "
        "(P ≥ 1); sv_fro keeps the fewest σ with √(Σσ²_kept/Σσ²) ≥ P; sv_cumulative (= quantile) the fewest with "
        "Σσ_kept/Σσ ≥ P (0 < P ≤ 1); threshold keeps σ > P; ratio keeps σ > P·σ_max. The minimal rank that "
        "satisfies the rule (sd-scripts keeps one more)",
    )
    p.add_argument("--param", type=float, metavar="P", help="parameter of the --dynamic rule")
    p.add_argument(
        "--conv-rank", type=int, metavar="R",
        help="rank (or cap, with --dynamic) for convs with a kernel larger than 1×1 (default: --rank)",
    )
    p.add_argument(
        "--method", choices=METHODS, default="auto",
        help="SVD for modules whose ΔW is built: full, randomized, or auto (randomized where it is faster at "
        "the same error; default)",
    )
    p.add_argument(
        "--base", metavar="BASE",
        help="base model (diffusers folder, diffusers state dict or LDM single file) to convert base-dependent "
        "modules (DoRA, (IA)³, OFT/BOFT, GLoRA) and modules of unknown layer shape",
    )
    p.add_argument(
        "--drop-unsupported", action="store_true",
        help="drop modules that cannot be converted without --base, and bias changes (LoRA has no bias), "
        "listing them in the report, instead of failing",
    )
    add_dtype(p)
    p.set_defaults(func=cmd_resize)


def cmd_resize(args: argparse.Namespace) -> int:
    report = resize_adapter(
        args.file,
        args.output,
        rank=args.rank,
        dynamic=args.dynamic,
        param=args.param,
        conv_rank=args.conv_rank,
        dtype=dtype_of(args.dtype),
        method=args.method,
        base=args.base,
        allow_drop=args.drop_unsupported,
        overwrite=args.force,
    )
    print_report(report, args.json)
    return 0
