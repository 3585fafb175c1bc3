"""``lyco eval CONFIG.toml [--set key=value …] [--json]``.

Registered through the ``lyco.commands`` entry point (``lyco_evaluator.cli:register``). Errors are
:class:`lyco_core.errors.LycoError` subclasses, printed by ``lyco``'s main as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Evaluate adapter checkpoints the way the LyCORIS paper does (arXiv 2309.14859): for every checkpoint and
the base model, generate images for the dataset's concepts with train / trigger / alter / style prompts,
then measure fidelity (DINOv2 image similarity, squared centroid distance), controllability (CLIP
text-image similarity), diversity (Vendi score) and base-model preservation (VGG19 style loss).

Writes results.csv and results.json (one row per checkpoint x concept x prompt type x metric), a
rankings table and report.html (image grids, scatter plots, rankings) into the config's output folder.
Generated images and encoder features are cached: a second run reuses them."""

EPILOG = """\
examples:
  lyco eval eval.toml
  lyco eval eval.toml --set prompts.n_images=100 --set generation.steps=25
  lyco eval eval.toml --set metrics.shap=true        # needs: pip install 'lyco-evaluator[shap]'
  lyco eval eval.toml --json > summary.json

A minimal config:
  [model]
  base = "models/sd15"                   # the base the adapters were trained on
  [[checkpoints]]
  path = "out/my_lokr-000010.safetensors"  # a file, a folder of them, or a diffusers pipeline folder
  [[checkpoints]]
  path = "out/my_lora.safetensors"
  strengths = [0.5, 1.0]
  [data]
  root = "dataset"                       # the training data: category/class[/sub-class]/ folders
  [prompts]
  n_images = 100                         # per (sub)class and prompt type (the paper: 100)
  text_map = { lun = "lobster" }         # trigger -> noun for CLIP text similarity (else removed)
  [encoders]
  dinov2 = "weights/dinov2-large"        # local folders/files only: nothing is downloaded
  clip = "weights/clip-vit-l-14"
  vgg19 = "weights/vgg19-dcbb9e9d.pth"
  [output]
  dir = "eval"                           # results.csv/json, aggregates.csv, report.html, caches

Rank scores are per concept, prompt type and metric across the checkpoints: 1 = best, 0 = worst
(distances reversed), averaged over sub-classes -> classes -> categories. The base model is generated
as the preservation reference and listed, but not ranked.
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to ``lyco``'s subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="evaluate adapter checkpoints with the LyCORIS paper's metrics (lyco eval CONFIG.toml)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG.toml",
                   help="the evaluation config (TOML); relative paths in it are taken from its folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set generation.steps=20 "
                        "(TOML values; repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (output files, rankings) on stdout instead of text")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation the config describes; print where the report is (or a JSON summary)."""
    from .config import load_config
    from .runner import evaluate

    cfg = load_config(Path(args.config), list(args.overrides or []))
    result = evaluate(cfg)
    if args.json:
        json.dump(result.summary(), sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        for line in result.summary_lines():
            print(line)
    return 0
