"""Learning-rate schedules: constant, cosine or linear decay, each after a linear warm-up.

The factors are those of diffusers' ``get_*_schedule_with_warmup`` (what sd-scripts and the diffusers examples
use), so a config ported from them trains with the same learning rates. At optimiser step ``t`` (0-based, the
number of ``scheduler.step()`` calls so far) with ``W`` warm-up steps and ``T`` total steps, each group's learning
rate is its base ``lr`` times::

    t < W:      t / W                                  (so step 0 of a warm-up runs at lr 0)
    constant:   1
    linear:     max(0, (T − t) / (T − W))
    cosine:     max(0, ½ (1 + cos(π (t − W) / (T − W))))
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lyco_core.errors import InvalidConfigError
from lyco_trainer.config import SchedulerConfig


class ScheduleFactor:
    """The learning-rate factor at a step. A callable object (not a closure) so ``LambdaLR.state_dict`` saves
    its fields and a resumed scheduler can be checked against the original."""

    def __init__(self, name: str, warmup_steps: int, total_steps: int) -> None:
        self.name = name
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        w, t_total = self.warmup_steps, self.total_steps
        if step < w:
            return float(step) / float(max(1, w))
        if self.name == "constant":
            return 1.0
        span = float(max(1, t_total - w))
        if self.name == "linear":
            return max(0.0, float(t_total - step) / span)
        progress = float(step - w) / span
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """A ``LambdaLR`` over ``optimizer`` for ``total_steps`` optimiser steps; call ``.step()`` after each one.

    Every parameter group is scaled by the same factor, so the UNet / text-encoder ratio is kept.
    ``state_dict()`` / ``load_state_dict()`` restore the step count (and the schedule's fields).

    Raises:
        InvalidConfigError: ``total_steps < 1``, or a warm-up longer than the run (``scheduler.warmup_steps``).
    """
    if total_steps < 1:
        raise InvalidConfigError(f"scheduler: the run has {total_steps} optimiser steps; need at least 1")
    if cfg.warmup_steps > total_steps:
        raise InvalidConfigError(
            f"scheduler.warmup_steps = {cfg.warmup_steps} is longer than the run ({total_steps} optimiser steps)"
        )
    if cfg.name not in ("constant", "cosine", "linear"):
        raise InvalidConfigError(f"scheduler.name: unknown schedule {cfg.name!r}")  # pragma: no cover
    return LambdaLR(optimizer, ScheduleFactor(cfg.name, cfg.warmup_steps, total_steps))
