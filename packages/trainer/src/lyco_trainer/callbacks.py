"""Progress events, the callback interface, a console progress bar and a TensorBoard writer.

The training loop (:func:`lyco_trainer.loop.train`) reports everything it does as :class:`ProgressEvent`
objects to a :class:`Callback`; services (the worker) forward them to a job record, the CLI draws a bar.
A callback can also cancel the run: :meth:`Callback.should_stop` is asked after every optimiser step, and
when it says True the loop writes a resumable state and returns with ``TrainResult.cancelled = True``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("lyco_trainer")

EventKind = Literal["start", "step", "epoch", "sample", "save", "state", "log", "end"]


class ProgressEvent(BaseModel):
    """One thing the loop did.

    ``kind``: ``start`` (plan known, before the first step), ``step`` (after each optimiser step),
    ``epoch`` (an epoch finished), ``sample`` (sample images written; ``path`` = their folder), ``save`` (an
    adapter/checkpoint written; ``path``), ``state`` (a resumable state written; ``path``), ``log`` (a message
    for the user, e.g. the data report or a skipped feature), ``end`` (the run finished or was cancelled).
    """

    model_config = ConfigDict(frozen=True)

    kind: EventKind
    step: int = Field(0, description="optimiser steps done")
    total_steps: int = Field(0, description="optimiser steps planned")
    epoch: int = Field(0, description="current epoch, 1-based (0 before the first)")
    total_epochs: int = 0
    loss: float | None = Field(None, description="mean loss of the last optimiser step")
    avg_loss: float | None = Field(None, description="moving average of the loss (last 50 steps)")
    lr: float | None = Field(None, description="learning rate of the first parameter group")
    it_per_s: float | None = Field(None, description="optimiser steps per second since the (re)start")
    eta_s: float | None = Field(None, description="estimated seconds left")
    peak_memory_mb: float | None = Field(None, description="peak CUDA memory allocated, else the process RSS peak")
    message: str = ""
    path: Path | None = None


@runtime_checkable
class Callback(Protocol):
    """What the loop calls. ``should_stop`` is optional in practice (see :func:`wants_stop`)."""

    def on_event(self, ev: ProgressEvent) -> None: ...

    def should_stop(self) -> bool: ...


def wants_stop(cb: Any) -> bool:
    """``cb.should_stop()`` when the callback has one, else False."""
    fn = getattr(cb, "should_stop", None)
    return bool(fn()) if callable(fn) else False


class CallbackList:
    """Several callbacks as one: events go to each, the run stops when any asks."""

    def __init__(self, callbacks: Iterable[Any]) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def on_event(self, ev: ProgressEvent) -> None:
        for c in self.callbacks:
            c.on_event(ev)

    def should_stop(self) -> bool:
        return any(wants_stop(c) for c in self.callbacks)

    def close(self) -> None:
        for c in self.callbacks:
            close = getattr(c, "close", None)
            if callable(close):
                close()


class StopAfter:
    """A callback that cancels the run once ``steps`` optimiser steps are done (tests, time-boxed runs)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.step = 0

    def on_event(self, ev: ProgressEvent) -> None:
        if ev.kind == "step":
            self.step = ev.step

    def should_stop(self) -> bool:
        return self.step >= self.steps


class EventLog:
    """Keeps every event (tests and services that poll)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def on_event(self, ev: ProgressEvent) -> None:
        self.events.append(ev)

    def should_stop(self) -> bool:
        return False

    def of(self, kind: str) -> list[ProgressEvent]:
        return [e for e in self.events if e.kind == kind]


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ConsoleProgress:
    """A one-line bar on stderr in the style of :mod:`lyco_core.progress`:

    ``train  12/100 steps [##..................]  12%  1.3 it/s  eta 0:01:10  epoch 1/10  loss 0.1234  lr 1.0e-04
    mem 812 MB``. Other events are printed on their own lines. The bar is drawn only on a terminal (or with
    ``LYCO_PROGRESS=1``); without it each epoch end is printed as a line, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        env = os.environ.get("LYCO_PROGRESS")
        if bar is None:
            bar = env not in ("0", "", "false", "no") if env is not None else self.stream.isatty()
        self.bar = bar
        self._last = 0.0
        self._open = False

    def _line(self, text: str) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_event(self, ev: ProgressEvent) -> None:
        if ev.kind == "step":
            now = time.monotonic()
            if not self.bar or (now - self._last < 0.1 and ev.step < ev.total_steps):
                return
            self._last = now
            frac = ev.step / ev.total_steps if ev.total_steps else 0.0
            filled = int(min(frac, 1.0) * 20)
            parts = [f"train  {ev.step}/{ev.total_steps} steps [{'#' * filled}{'.' * (20 - filled)}] {frac:4.0%}"]
            if ev.it_per_s is not None:
                parts.append(f"{ev.it_per_s:.2f} it/s  eta {_clock(ev.eta_s)}")
            parts.append(f"epoch {ev.epoch}/{ev.total_epochs}")
            if ev.avg_loss is not None:
                parts.append(f"loss {ev.avg_loss:.4f}")
            if ev.lr is not None:
                parts.append(f"lr {ev.lr:.1e}")
            if ev.peak_memory_mb is not None:
                parts.append(f"mem {ev.peak_memory_mb:.0f} MB")
            self.stream.write("\r" + "  ".join(parts))
            self.stream.flush()
            self._open = True
        elif ev.kind == "epoch":
            if not self.bar:
                loss = f"  loss {ev.avg_loss:.4f}" if ev.avg_loss is not None else ""
                self._line(f"epoch {ev.epoch}/{ev.total_epochs}  step {ev.step}/{ev.total_steps}{loss}")
        elif ev.message:
            self._line(ev.message)

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class TensorBoardCallback:
    """Writes loss / average loss / learning rate / it/s per step to ``log_dir`` (needs ``tensorboard``)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_event(self, ev: ProgressEvent) -> None:
        if ev.kind == "step":
            for name, value in (("loss", ev.loss), ("loss_avg", ev.avg_loss), ("lr", ev.lr), ("it_per_s", ev.it_per_s)):
                if value is not None:
                    self.writer.add_scalar(f"train/{name}", value, ev.step)
        elif ev.kind == "end":
            self.writer.flush()

    def should_stop(self) -> bool:
        return False

    def close(self) -> None:
        self.writer.close()


def tensorboard_callback(log_dir: Path) -> TensorBoardCallback | None:
    """A :class:`TensorBoardCallback`, or None (with a log line) when tensorboard is not installed."""
    try:
        return TensorBoardCallback(log_dir)
    except ImportError:
        log.info("tensorboard is not installed; not writing TensorBoard logs (pip install tensorboard)")
        return None


__all__ = [
    "Callback",
    "CallbackList",
    "ConsoleProgress",
    "EventLog",
    "ProgressEvent",
    "StopAfter",
    "TensorBoardCallback",
    "tensorboard_callback",
    "wants_stop",
]
