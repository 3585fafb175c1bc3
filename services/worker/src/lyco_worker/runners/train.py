"""Training jobs: :func:`lyco_trainer.loop.train` on the job's config, resumable across attempts.

``params["config"]`` is a trainer config dict (the API validated it and resolved base model / dataset references to
absolute paths). The worker owns ``output.dir``: it is always ``<work_dir>/output``, so every attempt of the job
sees the same folder. When that folder holds a complete ``state-*`` (an earlier attempt was killed, or the job was
cancelled and retried) the run resumes from the newest one (``resume=True``); otherwise it starts fresh and
replaces whatever an earlier attempt left (``overwrite=True``). Without ``output.state_every_steps`` in the config
the worker writes a state every :data:`DEFAULT_STATE_EVERY` steps, so a lost worker costs at most that many steps.

Progress: every :class:`~lyco_trainer.callbacks.ProgressEvent` goes to ``ctx.event`` (kind ``progress`` for steps,
which the context throttles and keeps as the job's snapshot; ``checkpoint`` for a resumable state written, so it
never reads as a job ``state`` change; the event's own kind otherwise). ``should_stop`` is
``ctx.should_stop()``: a cancel ends the loop with a resumable state and the job ``cancelled``.

Outputs: the final adapter (``adapter``; a ``native`` run's pipeline folder becomes a ``model`` zip) and the last
sample grid (``image``), registered when the job ends.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from lyco_core.errors import InvalidConfigError

from . import JobContext, Outcome, Output

#: resumable state interval (optimiser steps) when the config gives none
DEFAULT_STATE_EVERY = 50
_STATE = re.compile(r"state-(\d+)")


class _Forward:
    """The trainer callback: forwards events to the job, answers ``should_stop`` from the job's cancel flag."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.steps_run = 0
        self.first_step: int | None = None

    def on_event(self, ev: Any) -> None:
        data = ev.model_dump(mode="json", exclude_none=True)
        if ev.kind == "step":
            self.steps_run += 1
            if self.first_step is None:
                self.first_step = ev.step
            self.ctx.event("progress", data, snapshot=True)
        else:
            # the trainer's "state" (a resumable state written) must not read as a job state change
            kind = "checkpoint" if ev.kind == "state" else ev.kind
            self.ctx.event(kind, data, snapshot=ev.kind in ("start", "end"))
            if ev.message:
                self.ctx.log(ev.message)

    def should_stop(self) -> bool:
        return self.ctx.should_stop()


def prepare_config(params: dict[str, Any], work_dir: Path) -> Any:
    """The job's :class:`~lyco_trainer.config.TrainConfig` with ``output.dir`` in ``work_dir`` and a state interval."""
    from lyco_trainer.config import parse_config

    doc = params.get("config")
    if not isinstance(doc, dict):
        raise InvalidConfigError("params.config: a training job needs the trainer config (a JSON object)")
    doc = dict(doc)
    output = dict(doc.get("output") or {})
    output["dir"] = str(work_dir / "output")
    if output.get("state_every_steps") is None:
        output["state_every_steps"] = DEFAULT_STATE_EVERY
    doc["output"] = output
    return parse_config(doc, "config")


def _step_of(path: Path | None) -> int | None:
    m = _STATE.fullmatch(path.name) if path is not None else None
    return int(m[1]) if m else None


def run(ctx: JobContext) -> Outcome:
    from lyco_trainer import state as st
    from lyco_trainer.loop import train

    cfg = prepare_config(ctx.params, ctx.work_dir)
    out_dir = Path(cfg.output.dir)
    latest = st.latest_state(out_dir)
    if latest is not None:
        ctx.log(f"attempt {ctx.attempt}: resuming from {latest.name}")
    else:
        ctx.log(f"attempt {ctx.attempt}: starting from step 0")
    cb = _Forward(ctx)
    res = train(cfg, callback=cb, resume=latest is not None, overwrite=latest is None)

    result: dict[str, Any] = {
        "steps": res.steps,
        "total_steps": res.total_steps,
        "epochs": res.epochs,
        "final_loss": res.final_loss,
        "resumed_from": res.resumed_from.name if res.resumed_from else None,
        "resumed_from_step": _step_of(res.resumed_from),
        "steps_run": cb.steps_run,
        "state": res.state_path.name if res.state_path else None,
        "cancelled": res.cancelled,
    }
    outputs: list[Output] = []
    if res.final_path is not None:
        final = Path(res.final_path)
        meta = {"algo": cfg.network.algo, "steps": res.steps, "epochs": res.epochs}
        if final.is_dir():  # native: a diffusers pipeline folder
            archive = shutil.make_archive(str(ctx.work_dir / final.name), "zip", root_dir=final)
            outputs.append(Output("model", Path(archive), f"{final.name}.zip", meta, role="model"))
        else:
            outputs.append(Output("adapter", final, final.name, meta, role="adapter"))
    grids = sorted((out_dir / "samples").glob("samples-*.png"), key=lambda p: p.stat().st_mtime)
    if grids:
        outputs.append(Output("image", grids[-1], grids[-1].name, {"step": res.steps}, role="samples"))
    return Outcome(result=result, outputs=outputs, cancelled=res.cancelled)


__all__ = ["DEFAULT_STATE_EVERY", "prepare_config", "run"]
