"""``coreloop worker``: run a Celery worker for the rounds (the scale-out deployment).

    coreloop worker [--queues training,default] [--concurrency 1] [--beat]

One worker per GPU on ``training``, a CPU worker on ``default``, and exactly one process with
``--beat`` (the reaper's schedule). Settings come from ``CORELOOP_*`` variables as for the API.
The worker never migrates: it refuses to start unless the schema is current (``coreloop db
upgrade``, or ``coreloop serve``, which upgrades first), rather than failing at its first round.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from app.db import make_engine
from app.migrate import require_current
from app.settings import Settings, get_settings
from worker.embedded import ensure_broker_dir, worker_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="coreloop worker", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--queues", default="training,default", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="pool size (default: 1)")
    parser.add_argument("--beat", action="store_true", help="also run the periodic reaper")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument(
        "--max-tasks-per-child",
        type=int,
        default=None,
        help="recycle a pool process after this many tasks, releasing its memory (default: 1 "
        "with Redis; on the SQLite transport, once it has used 300 MB, i.e. ran a round)",
    )
    return parser.parse_args(argv)


def check_schema(settings: Settings) -> None:
    """Raise ``app.migrate.SchemaNotCurrent`` when the database needs ``coreloop db upgrade``."""
    engine = make_engine(settings)
    try:
        require_current(engine)
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker in the foreground until it is stopped; returns its exit status."""
    args = parse_args(argv)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    settings = get_settings()
    check_schema(settings)
    ensure_broker_dir(settings)
    from worker.celery_app import app  # builds the config from the settings

    try:
        app.worker_main(
            worker_args(
                queues=queues,
                concurrency=args.concurrency,
                beat=args.beat,
                loglevel=args.loglevel,
                max_tasks_per_child=args.max_tasks_per_child,
            )
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
