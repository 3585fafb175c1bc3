"""The one Celery task, ``lyco.run_job(job_id)``, and :func:`execute`, what it does.

A job's life in a worker (the broker carries only the id; the row in the database is the truth):

1. **Claim.** Load the job. Terminal (succeeded, failed, cancelled — a queued job cancelled through the API is
   already ``cancelled``) → nothing to do, the message is acknowledged. ``running`` → the message is a redelivery:
   if the worker that holds the job is still alive (another process on this machine, or a node that answers a
   Celery ping) this copy is a duplicate and the task retries later; otherwise that worker died (kill -9, lost
   machine, hard time limit) and the job goes back to ``queued``. Attempts at the cap (``job.max_attempts``) →
   ``failed`` (a job that kills its worker every time must not loop forever). Then ``queued → running``
   (attempts + 1, worker ``<node>#<pid>``), a compare-and-set: of two workers racing, one wins.
2. **Run** the runner of the job's kind (:mod:`lyco_worker.runners`) in ``<data_dir>/jobs/<id>/`` with a
   :class:`RunContext`: progress events become ``JobEvent`` rows (step-like events throttled to one per
   :data:`PROGRESS_EVERY_S`) and the job's ``progress`` snapshot; log lines go to ``job.log`` there; the cancel flag
   is polled at most every :data:`CANCEL_POLL_S`.
3. **Finish** in one transaction: register the outputs in the store, then ``succeeded`` (result with the file ids),
   ``cancelled`` (a cooperative stop) or ``failed`` (a one-line error). Every write of steps 2-3 is fenced on
   (state = running, attempts = this attempt): a worker that lost the job (it was taken over) writes nothing.

Exceptions of the runner fail the job; the process dying (kill, OOM, hard time limit) does not acknowledge the
message (``acks_late`` + ``reject_on_worker_lost``), so the broker delivers it again and step 1 resumes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_ready
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

import lyco_core  # noqa: F401 - imported in the worker parent so forked children start with torch loaded
from lyco_api.db import Job, StoredFile, make_engine, session_scope, utcnow
from lyco_api.jobs import TERMINAL, IllegalTransitionError, add_event, transition
from lyco_api.settings import Settings, get_settings
from lyco_api.store import FileStore
from lyco_core.errors import LycoError, NotFoundError

from .app import app
from .runners import Outcome, get_runner

log = logging.getLogger("lyco_worker")

#: least seconds between two stored step-like events (``progress``) of one job; others are never throttled
PROGRESS_EVERY_S = 0.25
#: least seconds between two reads of the job's cancel flag
CANCEL_POLL_S = 0.5
#: a duplicate delivery of a job another live worker runs is retried after this many seconds
BUSY_RETRY_S = 30
#: error messages are cut to this many characters
ERROR_LIMIT = 500


class JobBusyError(Exception):
    """The job is running in another live worker (a duplicate delivery); retry later."""


def one_line(text: str, limit: int = ERROR_LIMIT) -> str:
    """The first non-empty line of ``text``, at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_message(e: BaseException, settings: Settings | None = None) -> str:
    """The one-line ``error`` of a failed job."""
    if isinstance(e, SoftTimeLimitExceeded):
        limit = f" ({settings.job_soft_time_limit_s} s)" if settings is not None else ""
        return f"time limit exceeded{limit}"
    if isinstance(e, LycoError):
        return one_line(str(e)) or type(e).__name__
    msg = one_line(str(e))
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# --------------------------------------------------------------------------------------------- engines
_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def engine_for(settings: Settings) -> Engine:
    """One engine per process and database URL (engines are never shared across a fork)."""
    key = (os.getpid(), settings.database_url)
    with _engines_lock:
        eng = _engines.get(key)
        if eng is None:
            eng = make_engine(settings.database_url)
            _engines[key] = eng
    return eng


def node_name() -> str:
    """This worker's Celery node name (``gpu@host``), or the host name outside a worker."""
    from celery import current_task

    req = getattr(current_task, "request", None)
    host = getattr(req, "hostname", None) if req is not None else None
    return str(host or os.environ.get("LYCO_WORKER_NAME") or socket.gethostname())


def holder_name(node: str | None = None) -> str:
    """What ``job.worker`` says while this process runs a job: ``<node>#<pid>``."""
    return f"{node or node_name()}#{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped) is not alive
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def holder_alive(holder: str | None, my_node: str, settings: Settings | None = None, *,
                 ping_timeout_s: float = 1.0) -> bool:
    """Whether the worker process named ``holder`` (``<node>#<pid>``) still runs.

    Same node as ``my_node``: the pid is checked on this machine. Another node: alive when it answers a Celery ping
    (a busy prefork worker answers from its main process); a node that is gone, or a broker without broadcast
    support, counts as dead.
    """
    if not holder:
        return False
    node, _, pid_s = holder.rpartition("#")
    if not node:
        node, pid_s = holder, ""
    if node == my_node:
        if not pid_s.isdigit():
            return False
        pid = int(pid_s)
        return pid != os.getpid() and _pid_alive(pid)
    try:
        from lyco_api.queue import celery_client

        control = celery_client(settings).control if settings is not None else app.control
        replies = control.ping(destination=[node], timeout=ping_timeout_s)
    except Exception:  # a transport without broadcast, or the broker is down: no proof of life
        return False
    return any(node in r for r in replies or [])


# --------------------------------------------------------------------------------------------- context
class RunContext:
    """The :class:`lyco_worker.runners.JobContext` of one attempt (see the module doc)."""

    def __init__(self, settings: Settings, engine: Engine, job: Job, attempt: int, holder: str) -> None:
        self.settings = settings
        self.engine = engine
        self.job_id = job.id
        self.user_id = job.user_id
        self.kind = job.kind
        self.params: dict[str, Any] = dict(job.params or {})
        self.attempt = attempt
        self.holder = holder
        self.work_dir = work_dir(settings, job.id)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.store = FileStore(settings.data_dir)
        self.lost = False
        self._cancel = False
        self._last_poll = 0.0
        self._last_progress = 0.0
        self._pending: tuple[dict[str, Any], bool] | None = None
        self._log_path = self.work_dir / "job.log"

    # events -------------------------------------------------------------------------------------
    def _fenced(self) -> Any:
        return update(Job).where(Job.id == self.job_id, Job.state == "running", Job.attempts == self.attempt)

    def _write(self, kind: str, data: dict[str, Any], snapshot: bool) -> None:
        if self.lost:
            return
        with session_scope(self.engine) as s:
            if snapshot:
                res = s.execute(self._fenced().values(progress={"kind": kind, **data})
                                .execution_options(synchronize_session=False))
                if res.rowcount != 1:  # type: ignore[attr-defined]
                    self.lost = True
                    return
            add_event(s, self.job_id, kind, data)

    def event(self, kind: str, data: dict[str, Any], *, snapshot: bool = False) -> None:
        data = dict(data)
        if kind == "progress":
            now = time.monotonic()
            final = (data.get("done") is not None and data.get("done") == data.get("total")) or (
                data.get("step") is not None and data.get("step") == data.get("total_steps"))
            if now - self._last_progress < PROGRESS_EVERY_S and not final:
                self._pending = (data, snapshot)
                return
            self._last_progress = now
            self._pending = None
        else:
            self.flush()
        self._write(kind, data, snapshot)

    def flush(self) -> None:
        """Write the last throttled progress event, if one is waiting."""
        if self._pending is not None:
            data, snapshot = self._pending
            self._pending = None
            self._last_progress = time.monotonic()
            self._write("progress", data, snapshot)

    def log(self, message: str, *, event: bool = True) -> None:
        line = f"{utcnow().isoformat(timespec='seconds')} {message}"
        with contextlib.suppress(OSError), self._log_path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        if event:
            self.event("log", {"message": message})

    # cancel -------------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self._cancel or self.lost:
            return True
        now = time.monotonic()
        if now - self._last_poll < CANCEL_POLL_S:
            return False
        self._last_poll = now
        with session_scope(self.engine) as s:
            row = s.execute(select(Job.state, Job.attempts, Job.cancel_requested).where(Job.id == self.job_id)).one()
        if row.state != "running" or row.attempts != self.attempt:
            self.lost = True
            return True
        if row.cancel_requested:
            self._cancel = True
            self.log("cancel requested: stopping at the next safe point")
        return self._cancel

    # files --------------------------------------------------------------------------------------
    def store_path(self, file_id: str) -> Path:
        with session_scope(self.engine) as s:
            f = s.get(StoredFile, file_id)
            if f is None or f.user_id != self.user_id:
                raise NotFoundError(f"file {file_id} not found")
            from lyco_api.uploads import stored_path

            return Path(stored_path(self.store, Path(self.settings.models_dir), f))


def work_dir(settings: Settings, job_id: str) -> Path:
    """``<data_dir>/jobs/<job id>``: the job's folder on every attempt (states, logs, intermediate outputs)."""
    from lyco_api.routes.jobs import job_dir

    return job_dir(settings, job_id)


@contextlib.contextmanager
def _job_logging(path: Path) -> Iterator[None]:
    """Library log records (trainer, evaluator, core) also go to the job's log file while it runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(n) for n in ("lyco_trainer", "lyco_evaluator", "lyco_core", "lyco_worker")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


# --------------------------------------------------------------------------------------------- steps
def claim(settings: Settings, engine: Engine, job_id: str, holder: str) -> tuple[Job | None, int]:
    """Step 1 of the module doc. Returns (job, attempt) when this process now runs it, else (job or None, 0)."""
    my_node = holder.rpartition("#")[0] or holder
    with session_scope(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            log.warning("job %s: not in the database; message dropped", job_id)
            return None, 0
        if job.state in TERMINAL:
            log.info("job %s: already %s; nothing to do", job_id, job.state)
            return job, 0
        if job.state == "running":
            if holder_alive(job.worker, my_node, settings):
                raise JobBusyError(f"job {job_id} runs in {job.worker}")
            transition(s, job, "queued")
            add_event(s, job.id, "redelivered", {"previous_worker": job.worker, "attempts": job.attempts})
        if job.cancel_requested:
            transition(s, job, "cancelled", error=None)
            return job, 0
        if job.attempts >= job.max_attempts:
            transition(s, job, "failed", error=f"gave up after {job.attempts} attempt(s): the worker was lost "
                       "each time (killed, out of memory or over the hard time limit)")
            return job, 0
        try:
            transition(s, job, "running", worker=holder)
        except IllegalTransitionError:  # a second message of the same job won the race for it: drop this one
            log.info("job %s: claimed by another delivery; message dropped", job_id)
            return None, 0
        return job, job.attempts


def finish(ctx: RunContext, outcome: Outcome | None, error: str | None) -> Job | None:
    """Step 3 of the module doc: outputs registered and the final state, in one transaction (fenced)."""
    ctx.flush()
    with session_scope(ctx.engine) as s:
        job = s.get(Job, ctx.job_id)
        if job is None or job.state != "running" or job.attempts != ctx.attempt:
            log.warning("job %s: taken over by another worker; attempt %d writes nothing", ctx.job_id, ctx.attempt)
            return job
        if outcome is None:
            transition(s, job, "failed", error=error or "failed")
            return job
        result = dict(outcome.result)
        files: list[dict[str, Any]] = []
        for out in outcome.outputs:
            src = Path(out.path)
            if src.is_dir():
                src = Path(shutil.make_archive(str(ctx.work_dir / f".{src.name}"), "zip", root_dir=src))
                name = out.name if out.name.endswith(".zip") else f"{out.name}.zip"
            else:
                name = out.name
            row = ctx.store.add(s, job.user_id, out.kind, src, name, {**out.meta, "job_id": job.id, "role": out.role})
            files.append({"id": row.id, "name": row.name, "kind": row.kind, "role": out.role, "size": row.size})
        result["files"] = files
        if files:
            result["file_id"] = files[0]["id"]
        if outcome.cancelled:
            transition(s, job, "cancelled", result=result)
        else:
            transition(s, job, "succeeded", result=result)
        return job


def execute(job_id: str, settings: Settings | None = None, *, node: str | None = None) -> Job | None:
    """Run job ``job_id`` in this process: claim, run, finish (see the module doc). Returns the job row as it
    ended (or as found when there was nothing to do). Raises :class:`JobBusyError` for a duplicate delivery."""
    settings = settings or get_settings()
    engine = engine_for(settings)
    holder = holder_name(node)
    job, attempt = claim(settings, engine, job_id, holder)
    if job is None or attempt == 0:
        return job
    ctx = RunContext(settings, engine, job, attempt, holder)
    ctx.log(f"attempt {attempt}/{job.max_attempts} of {job.kind} job {job.id} in {holder}", event=False)
    outcome: Outcome | None = None
    error: str | None = None
    t0 = time.monotonic()
    with _job_logging(ctx.work_dir / "job.log"):
        try:
            outcome = get_runner(job.kind)(ctx)
        except (Exception, SoftTimeLimitExceeded) as e:
            error = error_message(e, settings)
            log.exception("job %s failed", job_id)
            ctx.log(f"failed: {error}", event=False)
    if outcome is not None:
        ctx.log(("cancelled" if outcome.cancelled else "finished") + f" after {time.monotonic() - t0:.1f} s",
                event=False)
    try:
        return finish(ctx, outcome, error)
    except Exception as e:  # registering outputs failed: the job still ends
        msg = error_message(e, settings)
        log.exception("job %s: finishing failed", job_id)
        with session_scope(engine) as s:
            row = s.get(Job, job_id)
            if row is not None and row.state == "running" and row.attempts == attempt:
                with contextlib.suppress(IllegalTransitionError):
                    transition(s, row, "failed", error=f"could not register outputs: {msg}")
            return row


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_kw: Any) -> None:
    """A worker that is ready reconciles jobs of dead workers (:mod:`.reconcile`, which also creates missing tables).

    It runs in a short-lived subprocess: the prefork parent must not open broker or database connections of its
    own, or children forked later can inherit a lock held by a connection pool and hang before they start.
    """
    import subprocess
    import sys

    node = str(getattr(sender, "hostname", None) or node_name())
    try:
        done = subprocess.run([sys.executable, "-m", "lyco_worker.reconcile", "--node", node], timeout=300,
                              check=False, capture_output=True, text=True)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("reconcile on start failed: %s", e)
        return
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            log.warning("reconcile: %s", line)
    if done.returncode:
        log.error("reconcile on start exited with %d", done.returncode)


@app.task(name="lyco.run_job", bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Any, job_id: str) -> None:
    """``lyco.run_job(job_id)``: :func:`execute` in this worker; a duplicate delivery retries later."""
    try:
        execute(job_id, get_settings(), node=self.request.hostname)
    except JobBusyError as e:
        log.info("%s; retrying in %d s", e, BUSY_RETRY_S)
        raise self.retry(countdown=BUSY_RETRY_S) from None


__all__ = [
    "PROGRESS_EVERY_S",
    "JobBusyError",
    "RunContext",
    "claim",
    "engine_for",
    "error_message",
    "execute",
    "finish",
    "holder_alive",
    "holder_name",
    "run_job",
    "work_dir",
]
