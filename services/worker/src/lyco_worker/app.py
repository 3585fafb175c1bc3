"""The Celery app of the Lyco workers (``celery -A lyco_worker.app worker`` or ``lyco worker``).

Configured from :class:`lyco_api.settings.Settings` (environment / ``.env``), the same definitions the API uses:

* queues ``gpu`` (train, generate, evaluate) and ``cpu`` (adapter operations); the API picks the queue per job
  (``send_task("lyco.run_job", args=[job_id], queue=job.queue)``), the broker carries only the job id;
* JSON only (task, result and accepted content); no result backend (the database is the job history);
* ``worker_prefetch_multiplier = 1``: a worker reserves one job at a time, long jobs never wait behind each other
  in a busy worker's buffer;
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged when it ends; a worker killed mid-job
  leaves the message to be delivered again. The loop this could cause (a job that kills its worker every time) is
  cut by the attempt cap: ``job.attempts`` (counted in the database) against ``job.max_attempts``
  (``LYCO_MAX_ATTEMPTS``), see :mod:`lyco_worker.tasks`;
* the Redis ``visibility_timeout`` (``LYCO_VISIBILITY_TIMEOUT_S``) in the broker transport options; the settings
  refuse a value not above the hard time limit, so a running job is never handed to a second worker by the
  broker alone; ``worker_cancel_long_running_tasks_on_connection_loss`` stops a job whose message the broker will
  redeliver after a lost connection;
* soft and hard time limits (``LYCO_JOB_SOFT_TIME_LIMIT_S`` / ``LYCO_JOB_HARD_TIME_LIMIT_S``): the soft one fails
  the job with "time limit exceeded" (a training keeps its last periodic state), the hard one kills the child;
* **a fresh child process per job**: ``worker_max_tasks_per_child = 1``. Each job runs in a newly forked prefork
  child that exits when the job ends, so GPU memory is returned to the driver and no CUDA context is ever
  inherited across a fork (the parent imports torch but never initialises CUDA). Forking from a parent that has
  torch loaded costs milliseconds, so CPU workers keep it too; ``lyco worker --max-tasks-per-child N`` changes it.
  We chose this over a subprocess per job because Celery's time limits, ``reject_on_worker_lost`` and
  ``revoke(terminate=True)`` then work on the process that runs the job;
* task events on (Flower), connection retries on start-up.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from lyco_api.queue import TASK_NAME, transport_options
from lyco_api.settings import Settings, get_settings

QUEUES = ("gpu", "cpu")


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration the module doc describes."""
    opts = transport_options(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": opts,
        "broker_connection_retry_on_startup": True,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_queues": tuple(Queue(q, routing_key=q) for q in QUEUES),
        "task_default_queue": "gpu",
        "task_routes": {TASK_NAME: {"queue": "gpu"}},  # the API passes the job's own queue explicitly
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": settings.job_soft_time_limit_s,
        "task_time_limit": settings.job_hard_time_limit_s,
        "worker_max_tasks_per_child": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: :func:`get_settings`) with the task module included."""
    settings = settings or get_settings()
    celery = Celery("lyco_worker", include=["lyco_worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


app = make_app()

__all__ = ["QUEUES", "app", "celery_config", "make_app"]
