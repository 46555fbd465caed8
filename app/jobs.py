"""Sending work to the worker by task name (the API never imports the worker or torch).

Jobs are sent only after the request's commit (``app.db.call_after_commit``), so the worker
never looks for a row that was rolled back or not yet visible. Arguments are IDs only.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine.url import make_url

from app.settings import Settings

log = logging.getLogger(__name__)

ROUND_RUN = "round.run"
TRAINING_QUEUE = "training"

_producers: dict[str, Celery] = {}
_producers_lock = threading.Lock()


def _transport_options(broker_url: str) -> dict[str, Any]:
    # kombu passes these to create_engine for the SQLAlchemy transport: only engine arguments.
    if broker_url.startswith("sqla+sqlite"):
        return {"connect_args": {"timeout": 30}}
    return {}


def _ensure_sqlite_dir(broker_url: str) -> None:
    if broker_url.startswith("sqla+sqlite"):
        database = make_url(broker_url.removeprefix("sqla+")).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def producer(broker_url: str) -> Celery:
    """A send-only Celery app for ``broker_url``, built once per URL and process."""
    with _producers_lock:
        celery = _producers.get(broker_url)
        if celery is None:
            _ensure_sqlite_dir(broker_url)
            celery = Celery("coreloop-api", broker=broker_url, set_as_current=False)
            celery.conf.update(
                broker_transport_options=_transport_options(broker_url),
                broker_connection_retry_on_startup=True,
                task_ignore_result=True,
                result_backend=None,
                task_serializer="json",
                accept_content=["json"],
                timezone="UTC",
            )
            _producers[broker_url] = celery
        return celery


def send_round(settings: Settings, round_id: int, *, queue: str = TRAINING_QUEUE) -> None:
    """Ask the worker to run round ``round_id`` (task ``round.run`` on the training queue).

    A broker that cannot be reached is logged, not raised: the round row is committed and
    stays ``queued``, and the worker re-sends queued rounds at start-up and from its reaper.
    """
    broker_url = settings.broker_url or ""
    try:
        producer(broker_url).send_task(ROUND_RUN, args=[round_id], queue=queue)
    except OperationalError:
        log.exception(
            "could not send round %s to the broker %s", round_id, maybe_sanitize_url(broker_url)
        )
