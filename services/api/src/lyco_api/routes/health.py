"""Liveness (``/health``), readiness (``/ready``: database and broker) and Prometheus metrics (``/metrics``).

Job metrics come from the database at scrape time, so they are right however many workers (processes or
machines) ran the jobs: queue depth per queue (queued jobs), jobs per state, a histogram of job durations (the
``duration_s`` that :func:`lyco_api.jobs.transition` stamps when a job ends) and failed jobs. Request metrics of
the API process itself are observed by :func:`observe_request` (called by the app's middleware).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel
from sqlalchemy import case, func, select, text
from sqlalchemy.engine import Engine

from ..db import JOB_KINDS, JOB_STATES, QUEUES, Job
from ..queue import ping_broker

router = APIRouter(tags=["health"])

#: Upper bounds (seconds) of the job-duration histogram: a CPU op takes seconds, a training run hours.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
                    43200.0, 86400.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class JobMetricsCollector(Collector):
    """Prometheus collector reading job metrics from the database on each scrape."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily("lyco_queue_depth", "jobs waiting in each queue (state queued)", labels=["queue"])
        states = GaugeMetricFamily("lyco_jobs", "jobs per state and kind", labels=["state", "kind"])
        failures = CounterMetricFamily("lyco_job_failures", "jobs that ended failed", labels=["kind", "queue"])
        hist = HistogramMetricFamily("lyco_job_duration_seconds", "duration of the last attempt of finished jobs",
                                     labels=["kind", "queue"])
        with self.engine.connect() as conn:
            counts: dict[tuple[str, str, str], int] = {}
            for state, kind, queue, n in conn.execute(
                    select(Job.state, Job.kind, Job.queue, func.count()).group_by(Job.state, Job.kind, Job.queue)):
                counts[(state, kind, queue)] = int(n)
            cols: list[Any] = [Job.kind, Job.queue, func.count(), func.sum(Job.duration_s)]
            cols += [func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in DURATION_BUCKETS]
            rows = conn.execute(select(*cols).where(Job.duration_s.is_not(None)).group_by(Job.kind, Job.queue)).all()
        for q in QUEUES:
            depth.add_metric([q], sum(n for (st, _k, qq), n in counts.items() if st == "queued" and qq == q))
        for st in JOB_STATES:
            for k in JOB_KINDS:
                states.add_metric([st, k], sum(n for (s2, k2, _q), n in counts.items() if s2 == st and k2 == k))
        for k in JOB_KINDS:
            for q in QUEUES:
                failures.add_metric([k, q], counts.get(("failed", k, q), 0))
        for row in rows:
            kind, queue, n, total = row[0], row[1], int(row[2]), float(row[3] or 0.0)
            buckets = [(repr(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, row[4:])]
            buckets.append(("+Inf", n))
            hist.add_metric([kind, queue], buckets, total)
        yield from (depth, states, failures, hist)


def make_registry(engine: Engine) -> CollectorRegistry:
    """A registry with the job collector and the API's request metrics (one per app)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobMetricsCollector(engine))
    reg.register(_RequestCollector())
    return reg


def collect_metrics(engine: Engine) -> bytes:
    """The Prometheus text exposition of the job metrics of the database behind ``engine``."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobMetricsCollector(engine))
    return generate_latest(reg)


# Request metrics live in a private registry of this process, exposed through every app's registry.
_request_registry = CollectorRegistry(auto_describe=True)
REQUESTS = Counter("lyco_http_requests", "HTTP requests answered", ["method", "route", "status"],
                   registry=_request_registry)
REQUEST_SECONDS = Histogram("lyco_http_request_duration_seconds", "HTTP request latency", ["method", "route"],
                            buckets=REQUEST_BUCKETS, registry=_request_registry)


class _RequestCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from _request_registry.collect()


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Count one answered request; ``route`` is the route template (``/api/v1/jobs/{job_id}``), not the URL."""
    REQUESTS.labels(method, route, str(status)).inc()
    REQUEST_SECONDS.labels(method, route).observe(seconds)


class HealthOut(BaseModel):
    status: str


class ReadyOut(BaseModel):
    status: str
    database: str
    broker: str


@router.get("/health", response_model=HealthOut, summary="Liveness: the API process answers")
def health() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/ready", response_model=ReadyOut, summary="Readiness: database and broker reachable (else 503)",
            responses={503: {"model": ReadyOut, "description": "database or broker unreachable"}})
def ready(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        db = "ok"
    except Exception:
        db = "unreachable"
    broker = "ok" if ping_broker(request.app.state.settings, timeout_s=2.0) else "unreachable"
    ok = db == "ok" and broker == "ok"
    body = ReadyOut(status="ready" if ok else "not ready", database=db, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
