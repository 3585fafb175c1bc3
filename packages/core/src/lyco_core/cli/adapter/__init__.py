"""`lyco adapter …`: operations on adapter files, one module per operation (a thin layer over
:mod:`lyco_core.ops`). Each module has ``register(subparsers)``."""

from __future__ import annotations

import argparse

from . import bake, check, convert, extract, inspect, merge, rescale, resize

#: Operation modules in the order ``lyco adapter --help`` lists them.
OPERATIONS = (inspect, check, bake, merge, rescale, resize, convert, extract)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "adapter",
        help="inspect, bake, merge, rescale, resize, convert, extract and check adapter files",
        description="Operations on adapter files (kohya/LyCORIS, PEFT, diffusers, ComfyUI). "
        "Outputs are written atomically and never replace an existing file without --force.",
    )
    cmds = p.add_subparsers(dest="adapter_command", metavar="OPERATION")
    p.set_defaults(func=lambda a: p.print_help() or 2)
    for op in OPERATIONS:
        op.register(cmds)
