"""Progress reporting for long operations: a text bar on stderr, or a callback for services.

Core depends on no progress library, so this is a small bar in the style of tqdm:
``bake  123/278 modules [#########.......]  44%  12.3 it/s  eta 0:00:12``. It is drawn only when stderr is a
terminal (or ``LYCO_PROGRESS=1``), never when ``LYCO_PROGRESS=0``. Services pass ``callback(done, total)``
instead, to forward progress to a job record.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

ProgressCallback = Callable[[int, int], None]


def _enabled() -> bool:
    env = os.environ.get("LYCO_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    callback: ProgressCallback | None = None,
) -> Iterator[T]:
    """Yield ``items``, drawing a bar on stderr (see module docstring) and calling ``callback(done, total)``."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    draw = _enabled()
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        if callback is not None:
            callback(done, total)
        now = time.monotonic()
        if draw and (now - last > 0.1 or done == total):
            last = now
            rate = done / max(now - start, 1e-9)
            if total:
                frac = min(done / total, 1.0)
                bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
                eta = _clock((total - done) / rate) if rate > 0 else "?"
                line = f"{desc}  {done}/{total} {unit} [{bar}] {frac:4.0%}  {rate:.1f} {unit}/s  eta {eta}"
            else:
                line = f"{desc}  {done} {unit}  {rate:.1f} {unit}/s"
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
    if draw and done:
        sys.stderr.write(f"\r{desc}  {done}/{total or done} {unit} done in {_clock(time.monotonic() - start)}\n")
        sys.stderr.flush()
