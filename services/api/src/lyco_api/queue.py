"""Enqueueing jobs: the API sends the task ``lyco.run_job`` by name with the job id only.

The API never imports worker code (the worker registers ``lyco.run_job``); the job row is committed before it
is enqueued and the worker re-reads it. Broker options here must match the worker's (visibility timeout).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu import Connection

from lyco_core.errors import LycoError

from .db import Job
from .settings import Settings

TASK_NAME = "lyco.run_job"

_clients: dict[tuple[str, str], Celery] = {}
_lock = threading.Lock()


class BrokerUnavailableError(LycoError):
    """The broker could not be reached to enqueue a job (the API answers 503)."""


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options: the visibility timeout from the settings, then ``broker_transport_options``."""
    opts: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    opts.update(settings.broker_transport_options)
    return opts


def celery_client(settings: Settings) -> Celery:
    """A Celery app used only to send tasks (cached per broker URL and options)."""
    key = (settings.broker_url, repr(sorted(transport_options(settings).items())))
    with _lock:
        app = _clients.get(key)
        if app is None:
            app = Celery("lyco-api", broker=settings.broker_url, set_as_current=False)
            app.conf.update(
                broker_transport_options=transport_options(settings),
                broker_connection_retry_on_startup=True,
                broker_connection_timeout=5,
                task_publish_retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                           "interval_max": 2},
                task_ignore_result=True,
            )
            _clients[key] = app
    return app


def enqueue(job: Job, settings: Settings) -> str:
    """Send ``lyco.run_job(job.id)`` to the job's queue; returns the Celery task id.

    Raises :class:`BrokerUnavailableError` if the broker cannot take the message; the job stays ``queued`` in
    the database, so a later retry or reconcile can enqueue it again.
    """
    try:
        res = celery_client(settings).send_task(TASK_NAME, args=[job.id], queue=job.queue, retry=True)
    except Exception as e:  # kombu raises OperationalError and friends
        raise BrokerUnavailableError(f"broker {redact(settings.broker_url)} unavailable: {type(e).__name__}") from e
    return str(res.id)


def ping_broker(settings: Settings, timeout_s: float = 2.0) -> bool:
    """Whether the broker answers within ``timeout_s`` (readiness probe)."""
    try:
        with Connection(settings.broker_url, transport_options=transport_options(settings),
                        connect_timeout=timeout_s) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
        return True
    except Exception:
        return False


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
