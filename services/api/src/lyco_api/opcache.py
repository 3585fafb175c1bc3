"""Reports of pure adapter operations, kept by the content of their inputs (``op_results`` table).

``inspect`` reads one adapter file and nothing else, and a stored file never changes after it is registered, so its
report is a function of the file's sha256 (and of the Lyco version that computed it). The API therefore answers an
``inspect`` of a file it has seen from the stored report, as a job that is ``succeeded`` from the start, instead of
queueing the same work again; that job's ``result`` is ``{"op", "cached": true, "report_key"}`` (a reference to the
kept report, which ``GET /ops/jobs/{id}`` resolves), not a copy. Reports enter the table when an adapter is
uploaded (the upload validates the file by inspecting it anyway) and when an inspect job succeeds.

Operations that write a file, or that read a base model from the models folder (which an operator may change on
disk), are never cached.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

import lyco_core

from .db import OpResult, utcnow

#: Operations whose report depends only on the bytes of their (stored, immutable) input files and their options.
CACHEABLE_OPS = frozenset({"inspect"})
#: Report keys that name the server-side path of an input: dropped before a report is kept.
PATH_KEYS = frozenset({"file"})


def result_key(op: str, input_sha256: dict[str, str | list[str]], options: dict[str, Any]) -> str | None:
    """The cache key of ``op`` on inputs with these sha256s and these options; None if ``op`` is not cacheable.

    The key covers the Lyco core version, so an upgrade that changes a report does not serve old ones.
    """
    if op not in CACHEABLE_OPS:
        return None
    doc = {"op": op, "core": lyco_core.__version__, "inputs": input_sha256, "options": options}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def portable(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without the keys that hold a server path of the input (what is kept in the table)."""
    return {k: v for k, v in report.items() if k not in PATH_KEYS}


#: Reports most recently used by this process, parsed (a key's report never changes, so they cannot go stale). An
#: inspect report of an SD-size adapter is ~100 KB of JSON; parsing it again on every request would cost more than
#: the rest of the request.
MEMORY_SIZE = 32
_memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
_memory_lock = threading.Lock()


def _memorize(key: str, report: dict[str, Any]) -> None:
    with _memory_lock:
        _memory[key] = report
        _memory.move_to_end(key)
        while len(_memory) > MEMORY_SIZE:
            _memory.popitem(last=False)


def lookup(s: OrmSession, key: str) -> dict[str, Any] | None:
    """The kept report for ``key`` (a shallow copy), or None."""
    with _memory_lock:
        report = _memory.get(key)
        if report is not None:
            _memory.move_to_end(key)
            return dict(report)
    row = s.get(OpResult, key)
    if row is None:
        return None
    _memorize(key, dict(row.report))
    return dict(row.report)


def remember(s: OrmSession, key: str, op: str, report: dict[str, Any]) -> None:
    """Keep ``report`` under ``key`` (flushed in a savepoint; a report already kept by another request wins)."""
    kept = portable(report)
    if s.scalar(select(OpResult.key).where(OpResult.key == key)) is None:  # the key only: not the whole report
        try:
            with s.begin_nested():
                s.add(OpResult(key=key, op=op, report=kept, created_at=utcnow()))
        except IntegrityError:
            pass
    _memorize(key, kept)
