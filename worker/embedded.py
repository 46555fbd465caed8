"""Start and stop the worker as a child process (``coreloop serve`` / ``coreloop demo``).

The child is ``python -m celery -A worker.celery_app worker --pool=prefork -c 1
-Q default,training -B`` (beat embedded) in its own session, with the
settings passed as ``CORELOOP_*`` environment variables (``worker.celery_app`` builds its config
from ``get_settings()`` at import). This module imports neither Celery nor torch, so the API
process that calls it stays light.

``exclusive`` (the default here) tells the worker it is the only one: at start-up it re-queues
every round left running at once, instead of waiting for their heartbeats to go stale.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from sqlalchemy.engine.url import make_url

from app.settings import Settings

EXCLUSIVE_ENV = "CORELOOP_WORKER_EXCLUSIVE"
PARENT_PID_ENV = "CORELOOP_WORKER_PARENT_PID"


def worker_args(
    queues: Sequence[str] = ("default", "training"),
    concurrency: int = 1,
    beat: bool = True,
    loglevel: str = "INFO",
    max_tasks_per_child: int | None = None,
) -> list[str]:
    """The ``celery worker`` arguments (after ``-A worker.celery_app``).

    ``max_tasks_per_child``: replace a pool child after this many tasks; None leaves it to the
    configuration (``worker.celery_app.pool_recycling``).
    """
    args = [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        *([f"--max-tasks-per-child={max_tasks_per_child}"] if max_tasks_per_child else []),
        f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if beat:
        args.append("--beat")
    return args


def ensure_broker_dir(settings: Settings) -> None:
    """kombu's SQLite transport creates its database file, not the file's directory."""
    broker_url = settings.broker_url or ""
    if broker_url.startswith("sqla+sqlite"):
        database = make_url(broker_url.removeprefix("sqla+")).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as ``CORELOOP_*`` environment variables (unset values left out)."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is not None:
            env[f"CORELOOP_{name.upper()}"] = str(value)
    return env


def start_worker(
    settings: Settings,
    *,
    exclusive: bool = True,
    log_file: IO[bytes] | None = None,
    extra_env: dict[str, str] | None = None,
    nice: int = 0,
) -> subprocess.Popen[bytes]:
    """Start the worker (with beat) as a child process in its own process group.

    ``log_file``: where its stdout/stderr go (default: inherited). ``nice``: how much lower
    than this process its CPU priority is. The child stops by itself when this process dies
    (it watches its parent).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_broker_dir(settings)
    env = {**os.environ, **settings_env(settings), **(extra_env or {})}
    env[PARENT_PID_ENV] = str(os.getpid())
    env[EXCLUSIVE_ENV] = "1" if exclusive else "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *worker_args()]
    return subprocess.Popen(
        ["nice", "-n", str(nice), *command] if nice else command,
        env=env,
        cwd=Path.cwd(),
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file is not None else None,
        start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM (warm shutdown), wait up to ``timeout`` s, then SIGKILL the whole group.

    A round killed this way is re-queued by the next worker's start-up (or by the reaper).
    Returns the exit status.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    kill_group(proc)
    return proc.wait()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL every process of the worker's group (main process, pool children, beat)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
