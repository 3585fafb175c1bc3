"""Job state machine: creation, transitions, events and cancellation (the service layer over ``db.Job``).

States::

    queued ──▶ running ──▶ succeeded | failed | cancelled
      │  ▲        │
      │  └────────┘  running → queued: the broker redelivers the job (worker lost); the next start is a new attempt
      └──▶ cancelled | failed   (cancelled before it started; failed when it could not be delivered)
    failed | cancelled ──▶ queued   (retry: see :func:`retry_job`)
    (new) ──▶ succeeded              (an operation answered from the result cache: :func:`create_answered_job`)

A transition is a compare-and-set on the state column, so two processes racing (the API cancelling a queued job
while a worker starts it) cannot both win: the loser gets :class:`IllegalTransitionError`. Every transition adds a
``state`` event. Entering ``running`` counts an attempt and stamps ``started_at``; entering a terminal state
stamps ``finished_at`` and ``duration_s``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm.attributes import set_committed_value

from lyco_core.errors import InvalidConfigError, LycoError, NotFoundError

from .db import JOB_KINDS, JOB_STATES, QUEUES, Job, JobEvent, new_id, utcnow

TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

#: Legal transitions: state → states it may move to.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
}

#: Default queue of each job kind: adapter operations are CPU work, the rest needs a GPU.
DEFAULT_QUEUE: dict[str, str] = {"train": "gpu", "generate": "gpu", "evaluate": "gpu", "op": "cpu"}

#: Columns a caller may set through :func:`transition`'s ``**fields``.
SETTABLE_FIELDS = frozenset({"progress", "result", "error", "worker", "cancel_requested"})


class IllegalTransitionError(LycoError):
    """A job cannot move from its current state to the one asked for (the API answers 409)."""


def _new_job(user_id: int, kind: str, params: dict[str, Any], queue: str | None, max_attempts: int) -> Job:
    if kind not in JOB_KINDS:
        raise InvalidConfigError(f"job kind {kind!r} is not one of {', '.join(JOB_KINDS)}")
    queue = queue or DEFAULT_QUEUE[kind]
    if queue not in QUEUES:
        raise InvalidConfigError(f"queue {queue!r} is not one of {', '.join(QUEUES)}")
    if max_attempts < 1:
        raise InvalidConfigError(f"max_attempts must be >= 1, got {max_attempts}")
    return Job(id=new_id(), user_id=user_id, kind=kind, queue=queue, state="queued", params=dict(params), attempts=0,
               max_attempts=max_attempts, cancel_requested=False, created_at=utcnow())


def create_job(s: OrmSession, user_id: int, kind: str, params: dict[str, Any], queue: str | None = None,
               *, max_attempts: int = 3) -> Job:
    """Add a ``queued`` job (flushed, not committed: commit before :func:`lyco_api.queue.enqueue`)."""
    job = _new_job(user_id, kind, params, queue, max_attempts)
    s.add(job)
    # one flush for both rows (the unit of work inserts the job before its event): a round trip less per submission
    add_event(s, job.id, "state", {"state": "queued"}, flush=False)
    s.flush()
    return job


def create_answered_job(s: OrmSession, user_id: int, kind: str, params: dict[str, Any], result: dict[str, Any],
                        queue: str | None = None) -> Job:
    """Add a job that is ``succeeded`` from the start with ``result`` (an operation answered from
    :mod:`lyco_api.opcache`): it never reaches a queue or a worker, and its events are ``queued`` then ``succeeded``
    so that event streams read as for any other job. Inserted in its final state; flushed, not committed."""
    job = _new_job(user_id, kind, params, queue, 3)
    now = job.created_at
    job.state, job.result, job.started_at, job.finished_at, job.duration_s = "succeeded", dict(result), now, now, 0.0
    s.add(job)
    add_event(s, job.id, "state", {"state": "queued"}, flush=False)
    add_event(s, job.id, "state", {"state": "succeeded", "from": "queued", "cached": True}, flush=False)
    s.flush()
    return job


def get_job(s: OrmSession, job_id: str) -> Job:
    """The job with this id; :class:`NotFoundError` if there is none."""
    job = s.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


def transition(s: OrmSession, job: Job, state: str, **fields: Any) -> Job:
    """Move ``job`` to ``state`` atomically, setting ``fields`` (progress, result, error, worker, cancel_requested).

    Raises :class:`IllegalTransitionError` when the move is not legal from the job's state as the database holds
    it (it may have been changed by another process since ``job`` was loaded; ``job`` is refreshed then).
    The change is flushed, not committed.
    """
    if state not in JOB_STATES:
        raise InvalidConfigError(f"job state {state!r} is not one of {', '.join(JOB_STATES)}")
    unknown = set(fields) - SETTABLE_FIELDS
    if unknown:
        raise InvalidConfigError(f"transition cannot set {', '.join(sorted(unknown))}")
    s.flush()
    old = job.state
    if state not in TRANSITIONS[old]:
        raise IllegalTransitionError(f"job {job.id} cannot go from {old} to {state}")
    now = utcnow()
    values: dict[str, Any] = dict(fields)
    values["state"] = state
    if state == "running":
        values["attempts"] = job.attempts + 1
        values["started_at"] = now
        values["finished_at"] = None
        values["duration_s"] = None
    elif state in TERMINAL:
        values["finished_at"] = now
        values["duration_s"] = (now - job.started_at).total_seconds() if old == "running" and job.started_at else None
    elif state == "queued" and old == "running":
        values.setdefault("worker", None)
    res = s.execute(
        update(Job).where(Job.id == job.id, Job.state == old, Job.attempts == job.attempts).values(**values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        s.refresh(job)
        raise IllegalTransitionError(f"job {job.id} changed concurrently (now {job.state}); cannot go to {state}")
    for key, value in values.items():
        set_committed_value(job, key, value)
    data: dict[str, Any] = {"state": state, "from": old}
    if state == "running":
        data["attempt"] = values["attempts"]
    if fields.get("worker"):
        data["worker"] = fields["worker"]
    if fields.get("error"):
        data["error"] = fields["error"]
    add_event(s, job.id, "state", data)
    return job


def add_event(s: OrmSession, job_id: str, kind: str, data: dict[str, Any], *, flush: bool = True) -> JobEvent:
    """Append an event to a job's stream (flushed so that ``.id`` is set, unless ``flush=False``)."""
    ev = JobEvent(job_id=job_id, kind=kind, data=dict(data), created_at=utcnow())
    s.add(ev)
    if flush:
        s.flush()
    return ev


def events_after(s: OrmSession, job_id: str, after_id: int = 0, limit: int = 1000) -> list[JobEvent]:
    """A job's events with ``id > after_id``, oldest first (for SSE with ``Last-Event-ID``)."""
    stmt = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id)
            .order_by(JobEvent.id).limit(limit))
    return list(s.scalars(stmt))


def update_progress(s: OrmSession, job: Job, progress: dict[str, Any], *, event: bool = True) -> Job:
    """Store the latest progress snapshot of a running job and (by default) add a ``progress`` event."""
    job.progress = dict(progress)
    s.flush()
    if event:
        add_event(s, job.id, "progress", progress)
    return job


def request_cancel(s: OrmSession, job: Job) -> Job:
    """Cancel a job: a queued one becomes ``cancelled`` now (it will never start); a running one gets
    ``cancel_requested`` and its worker stops it cooperatively. A finished job raises
    :class:`IllegalTransitionError`.
    """
    if job.state in TERMINAL:
        raise IllegalTransitionError(f"job {job.id} is {job.state} already; nothing to cancel")
    if job.state == "queued":
        try:
            return transition(s, job, "cancelled", cancel_requested=True)
        except IllegalTransitionError:
            if job.state in TERMINAL:  # finished meanwhile
                raise
    # running (or started while we tried): ask the worker
    s.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True)
              .execution_options(synchronize_session=False))
    set_committed_value(job, "cancel_requested", True)
    add_event(s, job.id, "cancel_requested", {"state": job.state})
    return job


def retry_job(s: OrmSession, job: Job) -> Job:
    """Put a failed or cancelled job back in the queue with a fresh attempt budget (enqueue it after commit)."""
    if job.state not in ("failed", "cancelled"):
        raise IllegalTransitionError(f"job {job.id} is {job.state}; only failed or cancelled jobs can be retried")
    transition(s, job, "queued", error=None, cancel_requested=False, result=None)
    s.execute(update(Job).where(Job.id == job.id).values(attempts=0, finished_at=None, duration_s=None)
              .execution_options(synchronize_session=False))
    for key, value in (("attempts", 0), ("finished_at", None), ("duration_s", None)):
        set_committed_value(job, key, value)
    return job
