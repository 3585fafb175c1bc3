"""Job runners: one module per job kind, each a function ``run(ctx) -> Outcome``.

A runner knows nothing about Celery or the database. It reads ``ctx.params`` (what the API validated and stored),
works inside ``ctx.work_dir`` (``<data_dir>/jobs/<job id>/``, the same folder on every attempt, so a redelivered
training finds its states), reports through ``ctx.event`` / ``ctx.log``, asks ``ctx.should_stop()`` between units of
work, and returns an :class:`Outcome`: the result summary and the files to register. The task
(:mod:`lyco_worker.tasks`) registers those files and ends the job in one transaction, so a job's outputs appear in
the store exactly when the job becomes ``succeeded`` (or ``cancelled`` for a cancelled training's partial files).

Runners raise :class:`lyco_core.errors.LycoError` (one line naming the key or file) for bad input; the task turns any
exception into ``failed`` with a one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lyco_core.errors import InvalidConfigError


class JobContext(Protocol):
    """What a runner may use (implemented by :class:`lyco_worker.tasks.RunContext`)."""

    job_id: str
    user_id: Any
    kind: str
    params: dict[str, Any]
    work_dir: Path
    attempt: int

    def event(self, kind: str, data: dict[str, Any], *, snapshot: bool = False) -> None:
        """Record a progress event (``snapshot``: also the job's last progress snapshot); step-like events are
        throttled by the context, so runners may call this as often as they like."""

    def log(self, message: str) -> None:
        """A line for the job's log (file and a ``log`` event)."""

    def should_stop(self) -> bool:
        """True once a cancel was requested (or this worker lost the job): stop at the next safe point."""

    def store_path(self, file_id: str) -> Path:
        """The absolute path of a registered file of this job's user (NotFoundError when there is none)."""


@dataclass
class Output:
    """A file (or folder, registered as a zip) to register in the store when the job ends.

    ``kind``: a StoredFile kind (``adapter``, ``image``, ``report``, ``model``, ``other``); ``name``: the file name
    users see; ``meta``: stored with the file (the job id is added by the task)."""

    kind: str
    path: Path
    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    role: str = "output"


@dataclass
class Outcome:
    """What a runner did: ``result`` (JSON-able summary stored on the job), ``outputs`` (files to register) and
    whether it stopped because it was asked to (``cancelled``)."""

    result: dict[str, Any] = field(default_factory=dict)
    outputs: list[Output] = field(default_factory=list)
    cancelled: bool = False


class Cancelled(Exception):
    """Raised inside a runner's progress callback to unwind a library call when ``ctx.should_stop()``."""


Runner = Callable[[JobContext], Outcome]


def get_runner(kind: str) -> Runner:
    """The ``run`` function of job kind ``kind`` (train, generate, evaluate, op); modules are imported lazily so a
    worker parent process never imports diffusers (or touches CUDA) before forking."""
    if kind == "train":
        from .train import run
    elif kind == "generate":
        from .generate import run
    elif kind == "evaluate":
        from .evaluate import run
    elif kind == "op":
        from .ops import run
    else:
        raise InvalidConfigError(f"job kind {kind!r}: no runner (train, generate, evaluate, op)")
    return run


__all__ = ["Cancelled", "JobContext", "Outcome", "Output", "Runner", "get_runner"]
