"""Arguments and output handling shared by the ``lyco adapter`` operations."""

from __future__ import annotations

import argparse
import json

import torch

from ...errors import InvalidConfigError
from ...ops.report import OpReport

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_output(p: argparse.ArgumentParser, what: str = "output file (.safetensors)") -> None:
    """``-o/--output OUT`` (required), ``--force`` and ``--json``."""
    p.add_argument("-o", "--output", required=True, metavar="OUT", help=what)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def add_dtype(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=default,
        help="dtype of the written tensors" + (f" (default {default})" if default else " (default: keep)"),
    )


def dtype_of(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidConfigError(f"--dtype: {name!r} is not one of {sorted(DTYPES)}") from None


def print_report(report: OpReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        print("\n".join(report.summary_lines()))
