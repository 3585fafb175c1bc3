"""`lyco adapter convert FILE -o OUT --to kohya|peft|diffusers|comfy [...]`."""

from __future__ import annotations

import argparse

from ...ops.convert import ALGOS, DORA_AXES, FAMILIES, NAMINGS, TARGETS, convert_adapter
from .common import add_dtype, add_output, dtype_of, print_report


def register(cmds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = cmds.add_parser(
        "convert",
        help="convert an adapter between ecosystems (kohya, PEFT, diffusers, ComfyUI), namings, algorithms, bases",
        description="Convert an adapter file. Keys are first put in canonical kohya form (UNet in diffusers names "
        "for SD 1.x/2.x, LDM names for SDXL; lora_te_ for SD 1.x/2.x, lora_te1_/lora_te2_ for SDXL). Anything the "
        "conversion would lose (a dropped module or tensor, a change the target reads differently) makes it fail "
        "unless --allow-loss is given; the report lists what was lost. Base-dependent modules (DoRA, (IA)3, "
        "OFT/BOFT, GLoRA) need --base BASE wherever their weight change must be computed.",
    )
    p.add_argument("file", help="adapter file (.safetensors): kohya/LyCORIS keys, or diffusers/PEFT-style keys")
    add_output(p)
    p.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="kohya: LyCORIS/kohya keys, every algorithm, lossless. comfy: kohya keys plus what ComfyUI needs to "
        "give the same weight change ((IA)3 and diag-OFT rescale become exact diffs with --base, OFT constraints "
        "are baked into the blocks, output-axis DoRA is rescaled for ComfyUI's norm with --base). diffusers: "
        "load_lora_weights-ready (plain LoRA/LoCon only; use --algo lora for others). peft: PEFT names and config.",
    )
    p.add_argument(
        "--naming",
        choices=NAMINGS,
        help="UNet naming of kohya/comfy output (default: what kohya uses for the family: diffusers for SD 1.x/2.x, "
        "ldm for SDXL). Renaming between the two needs the family (from the file, --family or --base)",
    )
    p.add_argument("--family", choices=FAMILIES, help="the file's base family, when its keys and metadata do not tell")
    p.add_argument(
        "--algo",
        choices=ALGOS,
        help="change the algorithm: lora re-extracts every module by SVD of its exact weight change at --rank "
        "(relative error reported per module; plain LoRA of rank <= R is kept as is), full writes the exact "
        "change as a diff module",
    )
    p.add_argument("--rank", type=int, metavar="R", help="rank for --algo lora")
    p.add_argument("--conv-rank", type=int, metavar="R", help="rank for k×k convs (k > 1) with --algo lora "
                   "(default: --rank)")
    p.add_argument(
        "--dora-axis",
        choices=DORA_AXES,
        help="move DoRA magnitudes to this axis. There is no exact form (the norm along the other axis of W+ΔW "
        "depends on the base), so it needs --base: the exact change is re-extracted by SVD at the module's rank "
        "and the magnitude set to the exact norms; the error is reported. --algo full --base gives the exact change",
    )
    add_dtype(p)
    p.add_argument(
        "--to-base",
        choices=FAMILIES,
        metavar="FAMILY",
        help="re-target to another base family (sd1|sd2|sdxl): the same family carries over; sd1 <-> sd2 keeps "
        "the modules whose shapes fit (proj_in/proj_out reshaped) and drops the text encoder and cross-attention "
        "K/V (needs --allow-loss); sd1/sd2 <-> sdxl is refused",
    )
    p.add_argument(
        "--base",
        metavar="BASE",
        help="base model (diffusers folder, diffusers state dict or LDM single file). Without --to-base/"
        "--from-base: the model the file was made for (used for base-dependent weight changes and shapes); with "
        "them: the target base",
    )
    p.add_argument(
        "--from-base",
        metavar="BASE",
        help="source base of the file; with --base TARGET, project each weight change onto the target weights' "
        "dominant singular subspaces (LoRA-X, arXiv 2501.16559) and report the share of ‖ΔW‖ carried over",
    )
    p.add_argument("--project-rank", type=int, metavar="K", help="singular vectors kept per side in the projection "
                   "(default: the fewest holding 90%% of ‖W_target‖²)")
    p.add_argument("--allow-loss", action="store_true", help="write even when the conversion loses something "
                   "(the report lists each loss)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    report = convert_adapter(
        args.file,
        args.output,
        to=args.to,
        naming=args.naming,
        algo=args.algo,
        rank=args.rank,
        conv_rank=args.conv_rank,
        dora_axis=args.dora_axis,
        dtype=dtype_of(args.dtype),
        to_base=args.to_base,
        base=args.base,
        from_base=args.from_base,
        family=args.family,
        project_rank=args.project_rank,
        allow_loss=args.allow_loss,
        overwrite=args.force,
    )
    print_report(report, args.json)
    return 0
