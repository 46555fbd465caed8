"""Celery tasks: thin adapters from a message (IDs only) to ``worker.rounds`` / ``worker.reaper``.

- ``warm_start.run(warm_start_id)`` (queue ``training``): a project's self-supervised warm start
  (``worker.pretrain``), claimed, retried and reaped like a round.
- ``round.run(round_id)`` (queue ``training``): run the round if it can be claimed. Retried with
  backoff only for transient errors (database or broker connection); everything else ends the
  round ``failed`` in the database and the task returns normally.
- ``round.reap()`` (beat, every 30 s or a quarter of the heartbeat timeout if shorter, and once
  at worker start-up with ``startup=True``):
  re-queue rounds (and warm starts) whose heartbeat stopped, fail them after
  ``round_max_attempts``, and re-send ``round.run`` (``warm_start.run``) for queued ones that
  may have lost their message.
- ``broker.cleanup()`` (beat, SQLite transport only): delete consumed kombu messages older than
  an hour (kombu never deletes them).

A pool child that ran a round gives its memory back to the system: forked children (Redis)
live for one task; spawned ones (the SQLite transport) are replaced once they have used 300 MB
(``worker.celery_app.pool_recycling``), so the reaper's runs every 30 s reuse one light child
instead of starting a new interpreter each. Where they are forked, torch and the models are
imported once by the main process at start-up (``worker_init``), so a round, or a duplicate
message that finds nothing to claim, starts in milliseconds instead of seconds of imports;
importing torch creates no CUDA context, only the child that trains does. Where they are
spawned (the SQLite transport, see ``worker.celery_app.pool_start_method``), ``round.run``
imports torch itself.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_ready
from sqlalchemy import Boolean, DateTime, bindparam, create_engine, text

from app.db import make_engine, make_sessionmaker
from app.settings import get_settings
from worker import reaper
from worker.celery_app import (
    BROKER_CLEANUP,
    DEFAULT_QUEUE,
    ROUND_REAP,
    ROUND_RUN,
    TRAINING_QUEUE,
    TRANSIENT_ERRORS,
    app,
    is_sqlalchemy_broker,
)
from worker.embedded import EXCLUSIVE_ENV, PARENT_PID_ENV
from worker.pretrain_records import WARM_START_RUN, reap_warm_starts

log = logging.getLogger(__name__)

BROKER_MESSAGE_TTL = timedelta(hours=1)


@app.task(
    name=ROUND_RUN,
    acks_late=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def run_round_task(round_id: int) -> None:
    """Run one round (idempotent: a duplicate delivery finds nothing to claim)."""
    from worker.rounds import run_round  # preloaded by a forking worker (worker_init)

    run_round(int(round_id), get_settings())


def send_round(round_id: int) -> None:
    """Send ``round.run(round_id)`` to the ``training`` queue."""
    app.send_task(ROUND_RUN, args=[round_id], queue=TRAINING_QUEUE)


@app.task(
    name=WARM_START_RUN,
    acks_late=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def run_warm_start_task(warm_start_id: int) -> None:
    """Run a project's warm start (idempotent: a duplicate delivery finds nothing to claim)."""
    from worker.pretrain import run_warm_start  # preloaded by a forking worker (worker_init)

    run_warm_start(int(warm_start_id), get_settings())


def send_warm_start(warm_start_id: int) -> None:
    """Send ``warm_start.run(warm_start_id)`` to the ``training`` queue."""
    app.send_task(WARM_START_RUN, args=[warm_start_id], queue=TRAINING_QUEUE)


@app.task(name=ROUND_REAP, autoretry_for=TRANSIENT_ERRORS, retry_backoff=5, max_retries=3)
def reap_rounds_task(startup: bool = False, exclusive: bool = False) -> dict[str, list[int]]:
    """Re-queue stale rounds and (re-)send their messages, after the commit.

    ``startup``: re-send every queued round; ``exclusive`` (the only worker, just started):
    every running round is an orphan, re-queue it without waiting for its heartbeat to age.
    """
    settings = get_settings()
    engine = make_engine(settings)
    reap_args: dict[str, Any] = {
        "timeout_seconds": 0.0 if exclusive else settings.heartbeat_timeout_seconds,
        "max_attempts": settings.round_max_attempts,
        "resend_all_queued": startup,
    }
    try:
        result = reaper.reap_rounds(make_sessionmaker(engine), settings, **reap_args)
        warm = reap_warm_starts(make_sessionmaker(engine), settings, **reap_args)
    finally:
        engine.dispose()
    for round_id in result.to_send:
        send_round(round_id)
    for warm_start_id in warm.to_send:
        send_warm_start(warm_start_id)
    if warm.requeued or warm.failed or warm.resent:
        log.warning(
            "reaper: warm starts re-queued %s, failed %s, re-sent %s",
            warm.requeued,
            warm.failed,
            warm.resent,
        )
    if result.requeued or result.failed or result.resent:
        log.warning(
            "reaper: re-queued %s, failed %s, re-sent %s",
            result.requeued,
            result.failed,
            result.resent,
        )
    return {"requeued": result.requeued, "failed": result.failed, "resent": result.resent}


@app.task(name=BROKER_CLEANUP, autoretry_for=TRANSIENT_ERRORS, max_retries=1)
def clean_broker_task() -> int:
    """Delete consumed messages older than an hour from the SQLite transport's table."""
    broker_url = get_settings().broker_url or ""
    if not is_sqlalchemy_broker(broker_url):
        return 0
    return delete_consumed_messages(broker_url.removeprefix("sqla+"), datetime.now())


def delete_consumed_messages(database_url: str, now: datetime) -> int:
    """``DELETE FROM kombu_message WHERE visible = 0 AND timestamp < now - 1h``.

    kombu stamps ``timestamp`` with the local naive time when it hands a message out.
    """
    statement = text(
        "DELETE FROM kombu_message WHERE visible = :hidden AND timestamp < :cutoff"
    ).bindparams(
        bindparam("hidden", value=False, type_=Boolean()),
        bindparam("cutoff", value=now - BROKER_MESSAGE_TTL, type_=DateTime()),
    )
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            deleted = conn.execute(statement).rowcount
    finally:
        engine.dispose()
    return int(deleted)


@worker_ready.connect
def _reap_at_startup(sender: Any = None, **_: Any) -> None:
    """The SQLite transport does not redeliver: re-send every queued round once at start-up."""
    exclusive = os.environ.get(EXCLUSIVE_ENV) == "1"
    kwargs = {"startup": True, "exclusive": exclusive}
    app.send_task(ROUND_REAP, kwargs=kwargs, queue=DEFAULT_QUEUE)


@worker_process_init.connect
def _dump_stacks_on_sigusr2(sender: Any = None, **_: Any) -> None:
    """``kill -USR2 <pool process>`` writes its Python stacks to the worker's log."""
    # Celery replaces sys.stderr by a logging proxy without a file descriptor.
    faulthandler.register(signal.SIGUSR2, file=sys.__stderr__ or 2, all_threads=True)


@worker_init.connect
def _preload_training_code(sender: Any = None, **_: Any) -> None:
    """Import torch, ml and the runner before the pool forks (see the module doc)."""
    if app.conf.worker_pool_start_method == "fork":
        import worker.pretrain  # noqa: F401
        import worker.rounds  # noqa: F401


@worker_init.connect
def _watch_parent(sender: Any = None, **_: Any) -> None:
    """An embedded worker stops (warm shutdown) when the process that started it is gone."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(2.0)
        log.warning("parent process %s is gone; stopping the worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
