"""`lyco` entry point.

Core provides ``lyco adapter …``. Other Lyco packages add their subcommands (``train``, ``eval``, ``serve``,
``worker``) through the ``lyco.commands`` entry-point group: each entry point is a function
``register(subparsers)`` that adds one subparser whose ``func`` default runs the command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from ..errors import LycoError
from . import adapter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lyco",
        description="Lyco: train, inspect and convert LyCORIS-family adapters for Stable Diffusion.",
    )
    parser.add_argument("--version", action="store_true", help="print the lyco-core version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    adapter.register(sub)
    for ep in sorted(entry_points(group="lyco.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except Exception as e:  # a broken plugin must not take `lyco adapter` down with it
            print(f"lyco: warning: command {ep.name!r} ({ep.value}) is unavailable: {e}", file=sys.stderr)
            continue
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import __version__

        print(f"lyco-core {__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LycoError as e:
        print(f"lyco: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lyco: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
