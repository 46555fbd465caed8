"""The Celery application of the worker, built from ``app.settings`` at import.

``celery -A worker.celery_app worker ...`` finds ``app`` here. Everything durable lives in the
app database (see ``worker/records.py``); the broker only carries "look at round N" messages:

- named tasks, IDs-only JSON arguments, no result backend (``task_ignore_result``);
- ``task_acks_late`` + ``task_reject_on_worker_lost`` + prefetch 1: with Redis a message whose
  worker died is delivered again (the claim makes the duplicate a no-op); the SQLite transport
  never redelivers, which is why the reaper (beat) and the start-up re-send exist;
- queues ``training`` (rounds) and ``default`` (reaper, webhooks, broker cleanup).

The SQLite transport polls; its interval is a class attribute (passing ``polling_interval`` in
``broker_transport_options`` reaches ``create_engine`` and crashes the worker). On that transport
pool children are spawned, not forked (see :func:`pool_start_method`).
"""

from __future__ import annotations

from typing import Any

import kombu.exceptions
import kombu.transport.sqlalchemy
import redis.exceptions
from celery import Celery
from kombu import Queue
from sqlalchemy import exc as sa_exc

from app.settings import Settings, get_settings

ROUND_RUN = "round.run"
ROUND_REAP = "round.reap"
BROKER_CLEANUP = "broker.cleanup"
WEBHOOK_SWEEP = "webhook.sweep"  # defined in worker/webhooks.py
TRAINING_QUEUE = "training"
DEFAULT_QUEUE = "default"

REAP_EVERY_SECONDS = 30.0  # at most; sooner when the heartbeat timeout is short
BROKER_CLEANUP_EVERY_SECONDS = 600.0
WEBHOOK_SWEEP_EVERY_SECONDS = 60.0
TASK_MODULES = ["worker.tasks", "worker.webhooks"]

# Errors worth a retry (the database or the broker was briefly unreachable); any other error
# is a bug or bad data, and retrying it would only repeat it.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.DisconnectionError,
    kombu.exceptions.OperationalError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)

kombu.transport.sqlalchemy.Transport.polling_interval = 0.2


def is_sqlalchemy_broker(broker_url: str) -> bool:
    return broker_url.startswith("sqla+")


def reap_interval(settings: Settings) -> float:
    """Seconds between reaper runs: a quarter of the heartbeat timeout, within [1, 30]."""
    return max(1.0, min(REAP_EVERY_SECONDS, settings.heartbeat_timeout_seconds / 4))


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The reaper (every 30 s by default), the webhook sweep (every minute), and the
    kombu_message cleanup on the SQLite transport.

    Each beat message expires when the next one is due, so beats sent while the single
    worker slot is busy with a long round do not pile up in the broker.
    """
    every = reap_interval(settings)
    schedule: dict[str, dict[str, Any]] = {
        "reap-rounds": {
            "task": ROUND_REAP,
            "schedule": every,
            "options": {"queue": DEFAULT_QUEUE, "expires": every},
        },
        "sweep-webhooks": {
            "task": WEBHOOK_SWEEP,
            "schedule": WEBHOOK_SWEEP_EVERY_SECONDS,
            "options": {"queue": DEFAULT_QUEUE, "expires": WEBHOOK_SWEEP_EVERY_SECONDS},
        },
    }
    if is_sqlalchemy_broker(settings.broker_url or ""):
        schedule["clean-broker"] = {
            "task": BROKER_CLEANUP,
            "schedule": BROKER_CLEANUP_EVERY_SECONDS,
            "options": {"queue": DEFAULT_QUEUE, "expires": BROKER_CLEANUP_EVERY_SECONDS - 5},
        }
    return schedule


def pool_start_method(broker_url: str) -> str:
    """``spawn`` on the SQLite transport, ``fork`` otherwise.

    The worker's main process polls the broker's SQLite file from its main thread, and billiard
    forks pool children from another thread (its supervisor). A child forked while the main
    thread is inside SQLite (or holds a lock of kombu's or SQLAlchemy's) inherits that state:
    its own writes to the broker then fail with "database is locked" for ever (seen here, and
    reproduced with plain sqlite3: fork while holding a lock, then write in the child), or it
    hangs before running its task (seen here in 2 of about 20 fault-test runs). A spawned child
    is a fresh interpreter and inherits nothing; it costs an import of the task modules (and of
    torch, once a round starts). With Redis the main process holds no SQLite: fork is safe and
    the children start with torch already imported (``worker.tasks``).
    """
    return "spawn" if is_sqlalchemy_broker(broker_url) else "fork"


# A spawned pool child that has used more than this (KB of resident memory) is replaced after
# its task: one that imported torch for a round or a warm start (torch alone: about 570 MB)
# gives its memory back; one that ran the reaper or a webhook (the task modules: about 83 MB)
# lives on. Replacing that one too, after every reap (every 30 s), kept an idle `coreloop
# serve`'s worker at 4.1-4.2 s of CPU per 90 s, against 1.4-1.7 s without (a new interpreter
# and the task modules each time).
LIGHT_CHILD_MAX_KB = 300_000


def pool_recycling(broker_url: str) -> dict[str, int | None]:
    """When pool children are replaced: forked ones (Redis) after every task, since they start
    in milliseconds; spawned ones (the SQLite transport) once they hold a round's memory."""
    if pool_start_method(broker_url) == "spawn":
        return {
            "worker_max_tasks_per_child": None,
            "worker_max_memory_per_child": LIGHT_CHILD_MAX_KB,
        }
    return {"worker_max_tasks_per_child": 1, "worker_max_memory_per_child": None}


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings`` (the module-level ``app`` uses ``get_settings()``)."""
    broker_url = settings.broker_url or ""
    celery = Celery("coreloop", broker=broker_url, include=TASK_MODULES)
    transport_options: dict[str, Any] = {}
    if is_sqlalchemy_broker(broker_url) and "sqlite" in broker_url:
        transport_options["connect_args"] = {"timeout": 30}
    celery.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_pool_start_method=pool_start_method(broker_url),
        **pool_recycling(broker_url),
        worker_proc_alive_timeout=120.0,
        task_default_queue=DEFAULT_QUEUE,
        task_queues=[Queue(TRAINING_QUEUE), Queue(DEFAULT_QUEUE)],
        task_routes={
            ROUND_RUN: {"queue": TRAINING_QUEUE},
            ROUND_REAP: {"queue": DEFAULT_QUEUE},
            BROKER_CLEANUP: {"queue": DEFAULT_QUEUE},
        },
        beat_schedule=beat_schedule(settings),
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        worker_send_task_events=False,
        timezone="UTC",
    )
    return celery


app = make_celery(get_settings())
celery_app = app
