"""``lyco serve``: the Lyco API (uvicorn) and, unless ``--no-worker``, one Celery worker on this machine.

With no configuration nothing external is needed ("embedded mode", one person on one machine):

* the job store is SQLite in the data directory (the :class:`~lyco_api.settings.Settings` default,
  ``sqlite:///<data_dir>/lyco.db``);
* the broker is kombu's ``filesystem://`` transport: each message is a file in ``<data_dir>/broker/queue``, which
  the API (producer) and the worker subprocess (consumer) share; its fan-out table (Celery remote control, e.g.
  ``celery inspect ping``) lives in ``<data_dir>/broker/control``. kombu 5.7's other server-less transport,
  ``sqla+sqlite://``, was measured slower here (it polls every queue once a second: ~1 s per job instead of ~0.1 s,
  and 16 ms per send) and passes every transport option to ``create_engine``, so it breaks on Celery's
  ``visibility_timeout``.

``LYCO_DATABASE_URL`` / ``LYCO_BROKER_URL`` (environment or ``.env``) replace either with PostgreSQL / Redis, which
is also how the compose file's ``api`` service runs this module (``--no-worker``; its workers are separate
containers). The worker is started as a subprocess (queues ``gpu,cpu`` by default) in its own session, so one
Ctrl-C reaches it once, through this process: on SIGINT/SIGTERM the API shuts down gracefully, then the worker is
sent SIGTERM (Celery's warm shutdown: the running job may finish), after ``--worker-grace`` seconds SIGQUIT (cold
shutdown: the job's message goes back to the queue, and the job resumes from its saved state next time), and
SIGKILL as a last resort. If the worker dies on its own, the API stops too and the command exits 1.

A filesystem-transport message is removed from its folder when the worker takes it; a worker that is killed
(rather than stopped) therefore loses its in-flight message, and the job row stays ``running`` until the next
worker start reconciles it (``lyco_worker.reconcile``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .settings import Settings

log = logging.getLogger("lyco.serve")

#: How often the embedded worker looks for new messages (s); kombu's default of 1 s would add up to a second of
#: latency to every job.
FS_POLLING_INTERVAL_S = 0.1

def embedded_broker(data_dir: Path) -> tuple[str, dict[str, Any]]:
    """The server-less broker of embedded mode: ``("filesystem://", transport options)``.

    Creates ``<data_dir>/broker/{queue,control}``. Producer and consumer read and write the same queue folder
    (``data_folder_in == data_folder_out``), which is what makes it work across processes.
    """
    queue_dir = data_dir / "broker" / "queue"
    control_dir = data_dir / "broker" / "control"
    queue_dir.mkdir(parents=True, exist_ok=True)
    control_dir.mkdir(parents=True, exist_ok=True)
    opts: dict[str, Any] = {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "control_folder": str(control_dir),
        "polling_interval": FS_POLLING_INTERVAL_S,
    }
    return "filesystem://", opts


def configure(data_dir: Path | None = None) -> Settings:
    """Fill in the embedded defaults in ``os.environ`` and return the resulting settings.

    ``data_dir`` (``--data-dir``) overrides ``LYCO_DATA_DIR``. When no broker is configured (neither
    ``LYCO_BROKER_URL`` in the environment nor in ``.env``), ``LYCO_BROKER_URL`` / ``LYCO_BROKER_TRANSPORT_OPTIONS``
    are set to the filesystem broker under the data directory (options given in ``LYCO_BROKER_TRANSPORT_OPTIONS``
    win over ours). The database needs nothing: ``Settings`` already defaults to SQLite in the data directory.
    The environment is the channel because the API (this process) and the worker (a child) must agree.
    """
    from .settings import Settings, get_settings

    if data_dir is not None:
        os.environ["LYCO_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    settings = Settings()
    if "broker_url" not in settings.model_fields_set:
        url, opts = embedded_broker(settings.data_dir)
        opts.update(settings.broker_transport_options)
        os.environ["LYCO_BROKER_URL"] = url
        os.environ["LYCO_BROKER_TRANSPORT_OPTIONS"] = json.dumps(opts)
        settings = Settings()
    get_settings.cache_clear()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def app_factory() -> FastAPI:
    """The ASGI app for uvicorn's ``--factory`` (also used with ``--workers N``): ``create_app(get_settings())``,
    in a process whose garbage collection is tuned for serving (:func:`lyco_api.app.tune_gc`)."""
    from .app import create_app, tune_gc
    from .settings import get_settings

    app = create_app(get_settings())
    tune_gc()
    return app


def prepare_database(settings: Settings) -> None:
    """Create the tables once, before any server or worker process opens the database."""
    from .db import init_db, make_engine

    engine = make_engine(settings.database_url)
    try:
        init_db(engine)
    finally:
        engine.dispose()


def worker_command(queues: str, concurrency: int | None = None, extra: Sequence[str] = ()) -> list[str]:
    """argv of the embedded worker subprocess: ``lyco worker --queues <queues> [...]`` in this interpreter
    (``python -m lyco_worker.cli``, which works whether or not lyco-worker's ``lyco.commands`` entry point is
    installed)."""
    cmd = [sys.executable, "-m", "lyco_worker.cli", "--queues", queues]
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    return [*cmd, *extra]


def start_worker(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the worker in its own session (a terminal's Ctrl-C reaches it only through us).

    On Linux the child also gets SIGTERM if this process dies without cleaning up (``PR_SET_PDEATHSIG``).
    """
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop_worker(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """Stop the worker: SIGTERM (warm), after ``grace_s`` SIGQUIT (cold), after 10 s more SIGKILL.

    Returns the worker's exit status (negative: killed by that signal).
    """
    if proc.poll() is not None:
        return proc.returncode
    steps: list[tuple[signal.Signals, float]] = [(signal.SIGTERM, grace_s), (signal.SIGQUIT, 10.0),
                                                 (signal.SIGKILL, 10.0)]
    for sig, wait_s in steps:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            log.warning("worker %d still running %.0f s after %s", proc.pid, wait_s, sig.name)
    return proc.wait()


def run(args: argparse.Namespace) -> int:
    """Run ``lyco serve`` with parsed ``args``; returns the exit status (0 after SIGINT/SIGTERM)."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = configure(args.data_dir)
    prepare_database(settings)
    from .queue import redact

    log.info("data dir %s, database %s, broker %s", settings.data_dir, redact(settings.database_url),
             redact(settings.broker_url))

    stop = threading.Event()
    caught: list[int] = []

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        caught.append(sig)
        stop.set()

    # uvicorn installs its own handlers while it runs and re-raises the signal afterwards: it lands here instead
    # of killing the process before the worker is stopped.
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    worker: subprocess.Popen[bytes] | None = None
    worker_died = threading.Event()
    server: uvicorn.Server | None = None
    try:
        if not args.no_worker:
            worker = start_worker(worker_command(args.queues, args.concurrency))
            log.info("worker started (pid %d, queues %s)", worker.pid, args.queues)
        if args.workers > 1:
            uvicorn.run("lyco_api.serve:app_factory", factory=True, host=args.host, port=args.port,
                        workers=args.workers, log_level=args.log_level, proxy_headers=True)
            return 0
        config = uvicorn.Config(app_factory, factory=True, host=args.host, port=args.port,
                                log_level=args.log_level, proxy_headers=True)
        server = uvicorn.Server(config)
        if worker is not None:
            threading.Thread(target=_watch_worker, args=(worker, server, worker_died), daemon=True).start()
        if not stop.is_set():
            server.run()
        if worker_died.is_set():
            log.error("the worker exited (status %s); stopping", worker.returncode if worker else None)
            return 1
        if not server.started and not caught:
            log.error("the API did not start (port %d in use?)", args.port)
            return 1
        return 0
    finally:
        if worker is not None:
            status = stop_worker(worker, args.worker_grace)
            log.info("worker stopped (status %s)", status)
        for s, h in old.items():
            signal.signal(s, h)


def _watch_worker(proc: subprocess.Popen[bytes], server: Any, died: threading.Event) -> None:
    """Stop the API when the worker exits on its own."""
    while proc.poll() is None:
        if server.should_exit:
            return
        time.sleep(0.5)
    if not server.should_exit:
        died.set()
        server.should_exit = True


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``lyco`` command (entry point ``lyco.commands``: ``serve = lyco_api.serve:register``)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the Lyco API and one worker on this machine (no external server needed)",
        description=(
            "Run the Lyco HTTP API (uvicorn) and one job worker on this machine. With no configuration the job "
            "store is SQLite in the data directory and jobs travel through files in <data-dir>/broker, so no "
            "database or Redis server is needed. LYCO_DATABASE_URL and LYCO_BROKER_URL (environment or .env) "
            "switch to PostgreSQL and Redis; with --no-worker only the API runs (workers elsewhere: lyco worker). "
            "Set LYCO_ADMIN_KEY to create the first admin API key. SIGINT/SIGTERM stop both cleanly."
        ),
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lyco serve`` (shared with ``python -m lyco_api.serve``)."""
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port of the API (default 8000)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="root of the file store, the SQLite job store and the embedded broker "
                        "(default: LYCO_DATA_DIR, else ./lyco-data)")
    p.add_argument("--no-worker", action="store_true",
                   help="run only the API; jobs wait for a worker started elsewhere (lyco worker)")
    p.add_argument("--queues", default="gpu,cpu",
                   help="queues the embedded worker takes, comma-separated (default gpu,cpu)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="job processes of the embedded worker (default: lyco worker's default)")
    p.add_argument("--workers", type=int, default=1,
                   help="API server processes (default 1; 2 or more for many clients: measured with bench/api.py "
                   "at 50 clients on 2 cores, 2 processes cut the p99 latency ~1.5x, SQLite included)")
    p.add_argument("--worker-grace", type=float, default=30.0,
                   help="seconds the worker may spend finishing its job on shutdown before it is stopped cold "
                        "(its job then resumes from its saved state on the next start; default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="log level of the API server (default info)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lyco_api.serve [options]``: the same as ``lyco serve``."""
    p = argparse.ArgumentParser(prog="python -m lyco_api.serve", description="Run the Lyco API (and a worker).")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
