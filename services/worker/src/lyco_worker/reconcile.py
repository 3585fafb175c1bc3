"""Reconcile on worker start: jobs left ``running`` by a dead worker go back to the queue (or fail at the cap).

A worker that is killed (kill -9, OOM, lost machine) leaves its job ``running`` in the database. The broker gives
the message back only after the visibility timeout (days, since it must exceed the longest job), and a server-less
broker (``lyco serve``'s filesystem transport) loses it altogether. So every worker, when it is ready, looks at
the ``running`` jobs: one whose worker (``job.worker`` = ``<node>#<pid>``) is not alive
(:func:`lyco_worker.tasks.holder_alive`: the pid on this machine, a Celery ping for other nodes) is moved back to
``queued`` with a ``redelivered`` event and enqueued again, or marked ``failed`` when its attempts reached
``max_attempts``. The copy of the message the broker may still redeliver later is harmless: the task sees the job
running in a live worker (and retries later) or finished (and drops it).

The same liveness rule decides in the task itself, so a redelivered message and a reconciled job cannot both run.

Jobs still ``queued`` are sent again too (:func:`resend_queued`): a broker that restarted without persistence, or
the filesystem transport, may have lost their messages, and the database — not the broker — is the job's record.
A second message for a job is harmless for the same reason: the task starts a job only through the
``queued → running`` compare-and-set, and drops messages of jobs that are running elsewhere or finished.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from lyco_api.db import Job, session_scope
from lyco_api.jobs import IllegalTransitionError, add_event, transition
from lyco_api.queue import enqueue
from lyco_api.settings import Settings, get_settings

from .tasks import engine_for, holder_alive

log = logging.getLogger("lyco_worker")


def reconcile(settings: Settings | None = None, *, my_node: str, queues: tuple[str, ...] | None = None,
              requeue: bool = True) -> dict[str, list[str]]:
    """Requeue (or fail) the ``running`` jobs whose worker is dead; returns ``{"requeued": [...], "failed": [...],
    "alive": [...]}`` (job ids). ``queues``: only jobs of these queues (default: all); ``requeue=False`` only
    reports."""
    settings = settings or get_settings()
    engine = engine_for(settings)
    out: dict[str, list[str]] = {"requeued": [], "failed": [], "alive": []}
    with session_scope(engine) as s:
        stmt = select(Job).where(Job.state == "running")
        if queues:
            stmt = stmt.where(Job.queue.in_(queues))
        running = list(s.scalars(stmt))
    alive_cache: dict[str, bool] = {}
    to_enqueue: list[tuple[Job, str]] = []
    for job in running:
        holder = job.worker or ""
        if holder not in alive_cache:
            alive_cache[holder] = holder_alive(holder, my_node, settings)
        if alive_cache[holder]:
            out["alive"].append(job.id)
            continue
        if not requeue:
            out["requeued"].append(job.id)
            continue
        with session_scope(engine) as s:
            row = s.get(Job, job.id)
            if row is None or row.state != "running" or row.worker != job.worker:
                continue
            try:
                if row.attempts >= row.max_attempts:
                    transition(s, row, "failed", error=f"gave up after {row.attempts} attempt(s): the worker "
                               f"{holder or '?'} was lost")
                    out["failed"].append(row.id)
                    continue
                transition(s, row, "queued")
                add_event(s, row.id, "redelivered", {"previous_worker": holder, "attempts": row.attempts,
                                                     "by": "reconcile"})
            except IllegalTransitionError:
                continue
            to_enqueue.append((row, holder))
    for job, holder in to_enqueue:
        try:
            enqueue(job, settings)
            out["requeued"].append(job.id)
            log.warning("job %s: its worker %s is gone; queued again", job.id, holder)
        except Exception as e:  # the job stays queued; the next reconcile or a retry enqueues it
            log.error("job %s: could not enqueue after reconcile: %s", job.id, e)
    return out


def resend_queued(settings: Settings | None = None, *, queues: tuple[str, ...] | None = None) -> list[str]:
    """Send the message of every ``queued`` job (of ``queues``) again; returns the job ids sent."""
    settings = settings or get_settings()
    engine = engine_for(settings)
    with session_scope(engine) as s:
        stmt = select(Job).where(Job.state == "queued")
        if queues:
            stmt = stmt.where(Job.queue.in_(queues))
        queued = list(s.scalars(stmt.order_by(Job.created_at)))
    sent: list[str] = []
    for job in queued:
        try:
            enqueue(job, settings)
            sent.append(job.id)
        except Exception as e:  # the broker is down again: the next worker start tries again
            log.error("job %s: could not send its message again: %s", job.id, e)
            break
    if sent:
        log.warning("sent %d queued job(s) again (messages a restarted broker may have lost)", len(sent))
    return sent


def main(argv: list[str] | None = None) -> int:
    """``python -m lyco_worker.reconcile --node NAME``: create missing tables, then :func:`reconcile` as worker
    ``NAME``; prints what it changed. The worker runs this when it is ready (see :mod:`lyco_worker.tasks`)."""
    import argparse

    from lyco_api.db import init_db

    p = argparse.ArgumentParser(prog="python -m lyco_worker.reconcile")
    p.add_argument("--node", required=True, help="the Celery node name of the worker that starts")
    p.add_argument("--dry-run", action="store_true", help="only report the jobs of dead workers")
    args = p.parse_args(argv)
    settings = get_settings()
    engine = engine_for(settings)
    init_db(engine)
    res = reconcile(settings, my_node=args.node, requeue=not args.dry_run)
    if res["requeued"] or res["failed"]:
        print(f"requeued {res['requeued']}, failed {res['failed']}")
    if not args.dry_run:
        sent = resend_queued(settings)
        if sent:
            print(f"sent again {sent}")
    engine.dispose()
    return 0


__all__ = ["main", "reconcile", "resend_queued"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
