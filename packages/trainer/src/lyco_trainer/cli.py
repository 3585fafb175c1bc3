"""``lyco train CONFIG.toml [--set key=value …] [--resume [STATE]] [--dry-run] [--force]``.

Registered through the ``lyco.commands`` entry point (``lyco_trainer.cli:register``). Errors are
:class:`lyco_core.errors.LycoError` subclasses, printed by ``lyco``'s main as one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Fine-tune a Stable Diffusion 1.x / 2.x / SDXL base with a Lyco adapter (any algorithm and preset, or
'native' full fine-tuning), as the config file says. Adapters are saved to output.dir as
<name>-<epoch>.safetensors every output.save_every_epochs epochs and <name>.safetensors at the end,
with complete metadata (Lyco schema, sd-scripts ss_* keys, modelspec).

Cancel with Ctrl-C: the run writes a resumable state-<step>/ folder in output.dir first; continue it
with --resume."""

EPILOG = """\
examples:
  lyco train my_lokr.toml
  lyco train my_lokr.toml --set train.epochs=3 --set network.options.factor=8
  lyco train my_lokr.toml --dry-run            # check the config and the data; load no model
  lyco train my_lokr.toml --resume             # continue from the newest state in output.dir
  lyco train my_lokr.toml --resume out/state-00000300

A minimal config:
  [model]
  base = "models/sd15"                 # diffusers folder or .safetensors single file
  [network]
  algo = "lokr"                        # lora, loha, lokr, ia3, glora, full, diag-oft, boft, dylora, native
  preset = "attn-mlp"
  dim = 10000
  options = { factor = 8 }
  [data]
  root = "dataset"                     # category/class[/sub-class]/ folders of images + .txt captions
  [train]
  epochs = 10
  [output]
  dir = "out"
  name = "my_lokr"
"""


class _Interrupt:
    """A callback that turns Ctrl-C into a clean cancel (the loop writes a state, then returns)."""

    def __init__(self) -> None:
        self.stop = False

    def on_event(self, ev: Any) -> None:
        pass

    def should_stop(self) -> bool:
        return self.stop


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to ``lyco``'s subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "train",
        help="fine-tune SD 1.x/2.x/SDXL with a Lyco adapter (lyco train CONFIG.toml)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG.toml",
                   help="the training config (TOML); relative paths in it are taken from its folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set train.epochs=3, "
                        "--set network.options.factor=8, --set 'sample.prompts=[\"a dog\"]' (TOML values; "
                        "repeatable)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="STATE",
                   help="continue an interrupted run: from the newest complete state-* folder in output.dir, "
                        "or from the state folder given")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and scan the data, print the plan (images, buckets, steps), "
                        "load no model and write nothing")
    p.add_argument("--force", action="store_true",
                   help="start over even if output.dir holds the outputs or states of an earlier run "
                        "(its state-* folders are deleted, its adapter files replaced)")
    p.add_argument("--json", action="store_true",
                   help="print the plan (--dry-run) or the result as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=cmd_train)
    return p


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("lyco_trainer")
    if quiet or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .loop import plan_run

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        _, plan = plan_run(cfg)
        if args.json:
            print(json.dumps(plan.model_dump(mode="json"), indent=1))
        else:
            print("\n".join(plan.lines()))
            print("dry run: no model loaded, nothing written")
        return 0

    from .callbacks import CallbackList, ConsoleProgress
    from .loop import Trainer

    _setup_logging(args.quiet)
    interrupt = _Interrupt()
    console = None if args.quiet else ConsoleProgress()
    # log lines already reach stderr through logging; the console shows the bar and saves
    callbacks = CallbackList([interrupt, _NoLog(console) if console else None])
    trainer = Trainer(cfg, callbacks, overwrite=args.force)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupt.stop:  # a second Ctrl-C: stop now, without a state
            raise KeyboardInterrupt
        interrupt.stop = True
        print("\nlyco: stopping after this step (writing a resumable state); Ctrl-C again to abort",
              file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        result = trainer.run(args.resume)
    finally:
        signal.signal(signal.SIGINT, previous)
        if console is not None:
            console.close()
    if args.json:
        doc = {"cancelled": result.cancelled, "steps": result.steps, "total_steps": result.total_steps,
               "epochs": result.epochs, "final_loss": result.final_loss,
               "final_path": str(result.final_path) if result.final_path else None,
               "saved": [str(p) for p in result.saved], "samples": [str(p) for p in result.samples],
               "state_path": str(result.state_path) if result.state_path else None}
        print(json.dumps(doc, indent=1))
    elif result.cancelled:
        print(f"cancelled at step {result.steps}/{result.total_steps}; state: {result.state_path}")
    else:
        print(f"adapter: {result.final_path}" if cfg.network.algo != "native" else f"pipeline: {result.final_path}")
        if result.samples:
            print(f"samples: {result.samples[-1].parent}")
    return 0


class _NoLog:
    """Forwards every event except ``log`` (those already went through :mod:`logging`)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def on_event(self, ev: Any) -> None:
        if ev.kind != "log":
            self.inner.on_event(ev)

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        self.inner.close()


__all__ = ["cmd_train", "register"]
