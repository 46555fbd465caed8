"""Outgoing webhooks: subscriptions, the fan-out of events to deliveries, the delivery log.

An event of a subscribed kind (``label.created``, ``round.done``, ``model.published``) becomes
one ``WebhookDelivery`` row per active subscription of its project, in the transaction that
records the event; the worker is asked to send each one (task ``webhook.deliver`` on the
``default`` queue) only after that transaction commits. The worker POSTs the event as JSON,
signed with the subscription's secret (``X-Coreloop-Signature: sha256=<hex HMAC-SHA256 of the
raw body>``), and records every attempt in the row (``worker/webhooks.py``). Delivery is at
least once: receivers de-duplicate by ``event_id`` (or the ``X-Coreloop-Delivery`` header).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import call_after_commit
from app.errors import NotFound
from app.jobs import producer
from app.models import Event, utcnow
from app.netpolicy import check_webhook_url
from app.queue.service import require_project
from app.settings import Settings
from app.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from app.webhooks.schemas import WebhookCreate

log = logging.getLogger(__name__)

WEBHOOK_EVENTS = ("label.created", "round.done", "model.published")
WEBHOOK_DELIVER = "webhook.deliver"
DEFAULT_QUEUE = "default"
SIGNATURE_HEADER = "X-Coreloop-Signature"
EVENT_HEADER = "X-Coreloop-Event"
DELIVERY_HEADER = "X-Coreloop-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def event_body(event: Event) -> bytes:
    """The JSON body sent for ``event`` (the same bytes on every attempt)."""
    body: dict[str, Any] = {
        "event_id": event.id,
        "event": event.kind,
        "project_id": event.project_id,
        "actor_id": event.actor_id,
        "created_at": event.created_at.isoformat(),
        "payload": event.payload,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def create_subscription(
    session: Session,
    project_id: int,
    data: WebhookCreate,
    created_by: int | None,
    *,
    allow_private: bool = False,
) -> WebhookSubscription:
    """A new active subscription; its secret is the given one or a generated one.

    The URL must name a public address unless ``allow_private`` (``app.netpolicy``); the
    worker checks again, after resolving the name, at every delivery."""
    project = require_project(session, project_id)
    check_webhook_url(str(data.url), allow_private)
    subscription = WebhookSubscription(
        project_id=project.id,
        url=str(data.url),
        events=sorted(set(data.events)),
        secret=data.secret or f"whsec_{secrets.token_urlsafe(32)}",
        active=True,
        created_by=created_by,
        created_at=utcnow(),
    )
    session.add(subscription)
    session.flush()
    return subscription


def list_subscriptions(
    session: Session, project_id: int, *, include_inactive: bool = False
) -> list[WebhookSubscription]:
    require_project(session, project_id)
    stmt = select(WebhookSubscription).where(WebhookSubscription.project_id == project_id)
    if not include_inactive:
        stmt = stmt.where(WebhookSubscription.active.is_(True))
    return list(session.scalars(stmt.order_by(WebhookSubscription.id)))


def get_subscription(
    session: Session, project_id: int, subscription_id: int
) -> WebhookSubscription:
    found = session.get(WebhookSubscription, subscription_id)
    if found is None or found.project_id != project_id:
        raise NotFound(
            f"Project {project_id} has no webhook {subscription_id}.", code="WebhookNotFound"
        )
    return found


def deactivate_subscription(session: Session, project_id: int, subscription_id: int) -> None:
    """Stop sending to the subscription (idempotent); its delivery log is kept."""
    subscription = get_subscription(session, project_id, subscription_id)
    subscription.active = False
    session.flush()


def list_deliveries(
    session: Session,
    project_id: int,
    subscription_id: int,
    *,
    status: str | None,
    limit: int,
    before_id: int | None,
) -> list[WebhookDelivery]:
    """The subscription's deliveries, newest first; page with ``before_id``."""
    get_subscription(session, project_id, subscription_id)
    stmt = select(WebhookDelivery).where(WebhookDelivery.subscription_id == subscription_id)
    if status is not None:
        stmt = stmt.where(WebhookDelivery.status == status)
    if before_id is not None:
        stmt = stmt.where(WebhookDelivery.id < before_id)
    return list(session.scalars(stmt.order_by(WebhookDelivery.id.desc()).limit(limit)))


def fan_out_event(session: Session, settings: Settings, event: Event) -> list[int]:
    """:func:`fan_out` for an ``Event`` added through the ORM (flushed here for its id)."""
    session.flush()
    return fan_out(
        session, settings, event_id=event.id, project_id=event.project_id, kind=event.kind
    )


def fan_out(
    session: Session, settings: Settings, *, event_id: int, project_id: int | None, kind: str
) -> list[int]:
    """One pending delivery per active subscription of the event's project and kind.

    Call it in the transaction that inserts event ``event_id``; the deliveries are sent to
    the worker after the commit (nothing is sent if it rolls back). Kinds nobody can subscribe
    to cost nothing; others one indexed query. Returns the new delivery ids.
    """
    if kind not in WEBHOOK_EVENTS or project_id is None:
        return []
    subscriptions = session.scalars(
        select(WebhookSubscription).where(
            WebhookSubscription.project_id == project_id,
            WebhookSubscription.active.is_(True),
        )
    ).all()
    now = utcnow()
    rows = [
        WebhookDelivery(
            subscription_id=subscription.id,
            event_id=event_id,
            event_kind=kind,
            status=DeliveryStatus.pending.value,
            attempts=0,
            created_at=now,
        )
        for subscription in subscriptions
        if kind in subscription.events
    ]
    if not rows:
        return []
    session.add_all(rows)
    session.flush()
    ids = [row.id for row in rows]
    call_after_commit(session, lambda: send_deliveries(settings, ids))
    return ids


def record_event(
    session: Session,
    settings: Settings,
    *,
    project_id: int | None,
    actor_id: int | None,
    kind: str,
    payload: dict[str, Any],
) -> Event:
    """Add an audit event and fan it out to the project's webhooks (one call for both)."""
    event = Event(
        project_id=project_id, actor_id=actor_id, kind=kind, payload=payload, created_at=utcnow()
    )
    session.add(event)
    fan_out_event(session, settings, event)
    return event


def send_deliveries(
    settings: Settings,
    delivery_ids: Sequence[int],
    *,
    countdown: float | None = None,
    expires: float | None = None,
) -> None:
    """Ask the worker to send each delivery (``webhook.deliver`` on the default queue), in
    ``countdown`` seconds; a message not started within ``expires`` seconds is dropped.

    A broker that cannot be reached is logged, not raised: the rows are committed and stay
    pending, and the worker's sweep (``webhook.sweep``) sends them later.
    """
    broker_url = settings.broker_url or ""
    try:
        celery = producer(broker_url)
        for delivery_id in delivery_ids:
            celery.send_task(
                WEBHOOK_DELIVER,
                args=[delivery_id],
                queue=DEFAULT_QUEUE,
                countdown=countdown,
                expires=expires,
            )
    except OperationalError:
        log.exception(
            "could not send webhook deliveries %s to the broker %s",
            list(delivery_ids),
            maybe_sanitize_url(broker_url),
        )
