"""Evaluation jobs: :func:`lyco_evaluator.runner.evaluate` on the job's evaluator config.

``params["config"]`` is an evaluator config dict whose paths (base, dataset, checkpoints, encoders, templates) the API
resolved to absolute paths. ``output.dir`` is always ``<work_dir>/report`` (the image and feature caches live there
too, so a redelivered job reuses what an earlier attempt generated). The report's files (``report.html``, the
tables) are registered as ``report`` files with their role (``EvalResult.files`` key) in ``meta``; the job result
carries the criterion scores and ranking. A cancel is noticed between metric steps (the evaluator's progress
callback) and ends the job ``cancelled``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lyco_core.errors import InvalidConfigError

from . import Cancelled, JobContext, Outcome, Output


def prepare_config(params: dict[str, Any], work_dir: Path) -> Any:
    """The job's :class:`~lyco_evaluator.config.EvalConfig` with ``output.dir`` in ``work_dir``."""
    from lyco_evaluator.config import parse_config

    doc = params.get("config")
    if not isinstance(doc, dict):
        raise InvalidConfigError("params.config: an evaluation job needs the evaluator config (a JSON object)")
    doc = dict(doc)
    doc["output"] = {**dict(doc.get("output") or {}), "dir": str(work_dir / "report")}
    return parse_config(doc, "config")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | bool) or x is None:
        return x
    return str(x)


def run(ctx: JobContext) -> Outcome:
    from lyco_evaluator.runner import evaluate

    cfg = prepare_config(ctx.params, ctx.work_dir)
    ctx.event("start", {"message": f"evaluating {len(cfg.checkpoints)} checkpoint(s)"}, snapshot=True)

    def progress(done: int, total: int) -> None:
        ctx.event("progress", {"done": done, "total": total, "stage": "metrics"}, snapshot=True)
        if ctx.should_stop():
            raise Cancelled

    try:
        res = evaluate(cfg, callback=progress)
    except Cancelled:
        return Outcome(result={"cancelled": True}, cancelled=True)
    outputs = [
        Output("report", Path(path), Path(path).name, {"role": role}, role=role)
        for role, path in sorted(res.files.items())
        if Path(path).is_file()
    ]
    summary = res.summary()
    result: dict[str, Any] = {
        "scores": _jsonable(summary.get("scores", {})),
        "ranking": _jsonable(summary.get("ranking", [])),
        "stats": _jsonable(res.stats),
        "warnings": [str(w) for w in res.warnings][:50],
        "summary": [str(line) for line in res.summary_lines()][:100],
    }
    return Outcome(result=result, outputs=outputs)


__all__ = ["prepare_config", "run"]
