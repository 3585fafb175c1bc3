"""The FastAPI application: ``create_app(settings)`` (uvicorn: ``uvicorn --factory lyco_api.app:create_app``).

Routers are mounted under ``/api/v1`` (OpenAPI at ``/api/v1/openapi.json``, docs at ``/api/v1/docs``); each module
``lyco_api.routes.<name>`` that exists and imports is included. Errors: a :class:`lyco_core.errors.LycoError`
becomes ``{"detail": "<one line>"}`` with 400 (404 not found, 409 conflict, 413 too large, 503 broker down, or
the exception's ``http_status``); any other exception becomes a generic 500 and is logged, never shown.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DataError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lyco_core.errors import FileExistsLycoError, LycoError, NotFoundError

from .auth import PrincipalCache, ensure_admin_key
from .db import init_db, make_engine
from .jobs import IllegalTransitionError
from .queue import BrokerUnavailableError
from .routes import ROUTER_MODULES
from .routes.health import make_registry, observe_request
from .settings import Settings, get_settings
from .store import FileStore, TooLargeError

log = logging.getLogger("lyco_api")

API_PREFIX = "/api/v1"

_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (FileExistsLycoError, 409),
    (IllegalTransitionError, 409),
    (TooLargeError, 413),
    (BrokerUnavailableError, 503),
)


def status_for(exc: LycoError) -> int:
    """HTTP status of a Lyco error: its ``http_status`` attribute if it has one, else by class, else 400."""
    explicit = getattr(exc, "http_status", None)
    if isinstance(explicit, int):
        return explicit
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 400


def one_line(msg: str, limit: int = 500) -> str:
    """The first line of ``msg``, at most ``limit`` characters."""
    line = (msg.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


async def _lyco_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LycoError)
    code = status_for(exc)
    detail = one_line(str(exc)) or type(exc).__name__
    return JSONResponse({"detail": detail}, status_code=code)


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    """A value the database cannot store (PostgreSQL text cannot hold NUL characters): the client's input, 422."""
    reason = str(getattr(exc, "orig", exc)).splitlines()[0][:200]
    return JSONResponse({"detail": f"a value in the request cannot be stored: {reason}"}, status_code=422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def _operation_id(route: APIRoute) -> str:
    tag = str(route.tags[0]) if route.tags else "api"
    return f"{tag}-{route.name}"


class _RequestMetrics:
    """Pure ASGI middleware observing each HTTP request by route template (see ``observe_request``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            observe_request(scope.get("method", "?"), _route_template(scope), status, time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    """The matched route's path template (full, with the router prefix), or ``unmatched``."""
    ctx = (scope.get("fastapi") or {}).get("effective_route_context")  # FastAPI >= 0.16x: included routes
    template = getattr(ctx, "path_format", None)
    if not template:
        route = scope.get("route")
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return str(template or "unmatched")


#: Allocations between two young-generation collections in an API process (CPython's default: 700).
GC_GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Garbage collection for a server process: move everything alive after start-up (the imported engines, torch
    included) to the permanent generation, and collect the young generation less often.

    A request allocates thousands of short-lived objects (an inspect report is ~100 KB of JSON), so with the default
    thresholds full collections ran every few requests, each walking every object in the process: measured with
    ``bench/api.py`` (50 clients, 2 API processes) this took the p99 latency from 322 to 81 ms. Cyclic garbage is
    still collected, only less often; memory stays bounded. Called once per server process (``lyco serve``), not by
    :func:`create_app`, which tests call many times in one process.
    """
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def include_routers(app: FastAPI) -> list[str]:
    """Include ``lyco_api.routes.<name>.router`` for every name that imports; returns the names included."""
    included: list[str] = []
    for name in ROUTER_MODULES:
        modname = f"lyco_api.routes.{name}"
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name != modname:
                log.error("routes %s not mounted: %s", name, e)
            continue
        except ImportError as e:
            log.error("routes %s not mounted: %s", name, e)
            continue
        router = getattr(module, "router", None)
        if router is None:
            log.error("routes %s not mounted: module has no 'router'", name)
            continue
        app.include_router(router, prefix=API_PREFIX)
        included.append(name)
    return included


def create_app(settings: Settings | None = None, *, init: bool = True) -> FastAPI:
    """Build the API for ``settings`` (default: :func:`get_settings`).

    ``init=True`` creates missing tables and the ``LYCO_ADMIN_KEY`` admin key now (the database must be up);
    ``app.state`` holds ``settings``, ``engine``, ``store`` and ``metrics_registry``.
    """
    settings = settings or get_settings()
    engine = make_engine(settings.database_url, pool_size=settings.api_threads, max_overflow=10)
    if init:
        init_db(engine)
        if settings.admin_key:
            ensure_admin_key(engine, settings.admin_key)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # blocking routes and dependencies run in anyio's thread pool; as many threads as pooled connections, so a
        # request under load waits for a thread (cheap) rather than opening a connection it closes again
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield
        engine.dispose()

    app = FastAPI(
        title="Lyco API",
        summary="Train, generate, evaluate and operate on LyCORIS-family adapters",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.store = FileStore(settings.data_dir)
    app.state.principals = PrincipalCache(settings.auth_cache_s)
    app.state.metrics_registry = make_registry(engine)
    app.add_exception_handler(LycoError, _lyco_error)
    app.add_exception_handler(DataError, _unstorable_value)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(_RequestMetrics)

    from .admin import me_router
    from .admin import router as admin_router

    app.include_router(admin_router, prefix=API_PREFIX)
    app.include_router(me_router, prefix=API_PREFIX)
    app.state.routers = include_routers(app)
    return app

