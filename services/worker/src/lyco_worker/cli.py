"""``lyco worker --queues gpu,cpu [--concurrency N]``: a Celery worker for Lyco jobs on this machine.

Registered through the ``lyco.commands`` entry point ``worker = "lyco_worker.cli:register"``; also runs as
``python -m lyco_worker.cli …``. Broker, database and data folder come from the settings (``LYCO_BROKER_URL``,
``LYCO_DATABASE_URL``, ``LYCO_DATA_DIR`` …, environment or ``.env``), the same the API reads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from lyco_core.errors import InvalidConfigError, LycoError

QUEUES = ("gpu", "cpu")

DESCRIPTION = """\
Run a worker that takes Lyco jobs from the broker: training, generation and evaluation on the gpu queue,
adapter operations on the cpu queue. Many workers on many machines can share one broker (Redis) and one database
(PostgreSQL): that is how a Lyco server scales out. Run one worker per GPU with --queues gpu (and
CUDA_VISIBLE_DEVICES set to its GPU), and a CPU worker with --queues cpu.

Every job runs in a fresh child process (GPU memory is freed when the job ends); a worker killed mid-job leaves
its job to be delivered again, and the training resumes from its newest saved state. On start, a worker puts
jobs left running by dead workers back in the queue."""

EPILOG = """\
examples:
  CUDA_VISIBLE_DEVICES=0 lyco worker --queues gpu -n gpu0@%h
  lyco worker --queues cpu --concurrency 4
  lyco worker --queues gpu,cpu              # one machine without a separate CPU worker
"""


def parse_queues(text: str) -> list[str]:
    """``"gpu,cpu"`` → ``["gpu", "cpu"]``; an unknown queue is an error naming it."""
    out: list[str] = []
    for part in text.split(","):
        q = part.strip()
        if not q:
            continue
        if q not in QUEUES:
            raise InvalidConfigError(f"--queues: unknown queue {q!r} (gpu, cpu)")
        if q not in out:
            out.append(q)
    if not out:
        raise InvalidConfigError("--queues: give gpu, cpu or gpu,cpu")
    return out


def worker_argv(queues: Sequence[str], *, concurrency: int | None = None, hostname: str | None = None,
                loglevel: str = "INFO", max_tasks_per_child: int | None = None, pool: str = "prefork") -> list[str]:
    """The ``celery worker`` arguments for these options.

    Concurrency: 1 for ``gpu`` alone (one job per GPU), 2 for ``gpu,cpu`` (an adapter operation does not wait
    behind a training; run separate ``gpu`` and ``cpu`` workers to keep strictly one job per GPU), else the CPU
    count. Node name: ``<queues>@<host>`` (``gpu-cpu@host``) unless ``hostname``.
    """
    if concurrency is None:
        if list(queues) == ["gpu"]:
            concurrency = 1
        elif "gpu" in queues:
            concurrency = 2
        else:
            concurrency = max(1, min(4, os.cpu_count() or 1))
    if concurrency < 1:
        raise InvalidConfigError(f"--concurrency: {concurrency} is not a positive number")
    name = hostname or f"{'-'.join(queues)}@{socket.gethostname()}"
    argv = ["worker", "--queues", ",".join(queues), "--concurrency", str(concurrency), "--hostname", name,
            "--loglevel", loglevel, "--pool", pool, "--without-mingle", "--without-gossip"]
    if max_tasks_per_child is not None:
        if max_tasks_per_child < 0:
            raise InvalidConfigError(f"--max-tasks-per-child: {max_tasks_per_child} is negative")
        argv += ["--max-tasks-per-child", str(max_tasks_per_child)]
    return argv


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``worker`` to ``lyco``'s subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "worker", help="run a job worker (Celery) for a Lyco server",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", "-Q", default="gpu,cpu", metavar="QUEUES",
                   help="comma-separated queues to take jobs from: gpu (train, generate, evaluate), cpu (adapter "
                   "operations) (default: gpu,cpu)")
    p.add_argument("--concurrency", "-c", type=int, default=None, metavar="N",
                   help="jobs run at the same time (default: 1 for gpu, 2 for gpu,cpu, up to 4 for cpu)")
    p.add_argument("--hostname", "-n", default=None, metavar="NAME",
                   help="Celery node name, e.g. gpu0@%%h (default: <queues>@<host>); must be unique per worker")
    p.add_argument("--loglevel", "-l", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (default INFO)")
    p.add_argument("--max-tasks-per-child", type=int, default=None, metavar="N",
                   help="jobs per child process before it is replaced (default 1: a fresh process per job, which "
                   "frees GPU memory; 0 = never replace)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="execution pool (default prefork; time limits and the fresh process per job need it)")
    p.set_defaults(func=cmd_worker)
    return p


def cmd_worker(args: argparse.Namespace) -> int:
    """Start the Celery worker in this process (returns when it stops)."""
    try:
        queues = parse_queues(args.queues)
        argv = worker_argv(queues, concurrency=args.concurrency, hostname=args.hostname, loglevel=args.loglevel,
                           max_tasks_per_child=args.max_tasks_per_child, pool=args.pool)
    except LycoError as e:
        print(f"lyco: error: {e}", file=sys.stderr)
        return 2
    from .app import app

    app.worker_main(argv=argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lyco_worker.cli [worker] --queues …``."""
    parser = argparse.ArgumentParser(prog="lyco")
    register(parser.add_subparsers(dest="command", required=True))
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] != "worker":
        args_list = ["worker", *args_list]
    args = parser.parse_args(args_list)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
