"""`lyco adapter extract BASE TUNED -o OUT (--rank R | --mode M --param P) [--conv-rank R] [--tucker]`."""

from __future__ import annotations

import argparse

from ...ops.extract import extract_adapter
from ...ops.lowrank import METHODS
from .common import add_dtype, add_output, dtype_of, print_report

MODES = ("fixed", "threshold", "ratio", "quantile")


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "extract",
        help="a LoRA/LoCon from the difference of two checkpoints",
        description="Approximate TUNED − BASE layer by layer with a LoRA (attention/MLP layers of the UNet and "
        "text encoders; with --conv-rank also the resnet and sampler convs, a LoCon). BASE and TUNED may be "
        "diffusers folders, diffusers-named state dicts or LDM checkpoints, in different layouts. The report "
        "gives each module's rank and relative error ‖ΔW_lora − ΔW‖/‖ΔW‖.",
    )
    p.add_argument("base", metavar="BASE", help="the original model")
    p.add_argument("tuned", metavar="TUNED", help="the fine-tuned model")
    p.add_argument("--rank", type=int, help="rank of every linear module (with a --mode rule: the cap)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="fixed",
        help="rank rule: fixed (--rank), threshold (σ > P), ratio (σ > P·σ_max), quantile (Σσ kept ≥ P)",
    )
    p.add_argument("--param", type=float, help="P of the --mode rule")
    p.add_argument("--conv-rank", type=int, help="also extract resnet/sampler layers; 3×3 convs at this rank")
    p.add_argument("--tucker", action="store_true", help="3×3 convs as Tucker LoCon (lora_mid), as LyCORIS does")
    p.add_argument("--svd", choices=METHODS, default="auto", help="SVD: randomized where faster (auto), full, …")
    p.add_argument("--min-diff", type=float, default=0.0, help="skip layers whose max |ΔW| is at most this")
    p.add_argument("--no-text-encoder", action="store_true", help="extract the UNet only")
    add_dtype(p, "fp32")
    add_output(p)
    p.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> int:
    report = extract_adapter(
        args.base,
        args.tuned,
        args.output,
        rank=args.rank,
        mode=args.mode,
        param=args.param,
        conv_rank=args.conv_rank,
        tucker=args.tucker,
        method=args.svd,
        min_diff=args.min_diff,
        text_encoder=not args.no_text_encoder,
        dtype=dtype_of(args.dtype),
        overwrite=args.force,
    )
    print_report(report, args.json)
    return 0
