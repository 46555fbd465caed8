"""Delivering webhooks: tasks ``webhook.deliver(delivery_id)`` and ``webhook.sweep()``.

One attempt is three steps, none inside another:

1. claim (a short transaction): the delivery must be ``pending`` and due; a conditional UPDATE
   (``attempts = attempts + 1`` where ``attempts`` is still what was read) makes one worker
   the owner of the attempt, and moves ``next_attempt_at`` past the attempt's end so that a
   duplicate message waits instead of posting too;
2. POST the event's JSON with no transaction open (timeout 5 s, redirects not followed),
   headers ``X-Coreloop-Signature: sha256=<hex HMAC-SHA256 of the body>``,
   ``X-Coreloop-Event``, ``X-Coreloop-Delivery``, ``X-Coreloop-Attempt``; only to public
   addresses unless ``CORELOOP_WEBHOOK_ALLOW_PRIVATE`` (``app.netpolicy``): the name is
   resolved and every address checked before the attempt, and the connection is made only
   to a checked address (a URL refused there fails the delivery at once, nothing sent);
3. record (a short transaction): a 2xx is ``delivered``; anything else (another status, a
   connection error, a timeout) is retried after ``10 s * 2^(attempt-1)`` (at most an hour)
   until ``max_attempts`` (8: about 21 minutes in all), then ``failed``. The log keeps the
   status code, never the receiver's response body.

The row is the truth; a message is only a reminder. A retry is a new message with a countdown,
sent by the attempt that failed; a message that finds nothing due (a duplicate, or an attempt
in flight elsewhere) is dropped. ``webhook.sweep`` (beat, every minute) re-sends pending
deliveries whose time passed more than a minute ago (a lost message, a worker that died
mid-attempt), with an expiry, so sweeps while the worker is busy do not pile up messages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpcore
import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.models import Event, utcnow
from app.netpolicy import AddressRefused, GuardedBackend, check_destination
from app.settings import Settings, get_settings
from app.webhooks.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from app.webhooks.service import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    WEBHOOK_DELIVER,
    event_body,
    send_deliveries,
    sign,
)
from worker.celery_app import TRANSIENT_ERRORS, app

log = logging.getLogger(__name__)

WEBHOOK_SWEEP = "webhook.sweep"
TIMEOUT_SECONDS = 5.0
IN_FLIGHT = timedelta(seconds=60)  # how long a claimed attempt holds the row (> the timeout)
DUE_SLACK = timedelta(seconds=1)  # a message's countdown and the row's time may differ a little
SWEEP_GRACE = timedelta(seconds=60)
SWEEP_EVERY_SECONDS = 60.0  # the beat schedule's interval for ``webhook.sweep``
_PENDING = DeliveryStatus.pending.value


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay_seconds: float = 10.0
    max_delay_seconds: float = 3600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_seconds, self.base_delay_seconds * 2 ** (attempt - 1))


@dataclass(frozen=True)
class Attempt:
    """A claimed attempt: what to send where."""

    delivery_id: int
    number: int
    url: str
    secret: str
    kind: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    """Where a delivery stands after a call. ``retry_in``: the attempt made failed and the
    next one is due in that many seconds (the caller sends a message for it); None when no
    attempt was made (not due: a duplicate message, or an attempt in flight) or none is left."""

    status: str
    attempts: int
    status_code: int | None = None
    retry_in: float | None = None


def claim_attempt(
    sessions: sessionmaker[Session], delivery_id: int, now: datetime
) -> Attempt | Outcome:
    """Take the next attempt of a due, pending delivery; else say where it stands."""
    with unit_of_work(sessions) as session:
        row = session.execute(
            select(WebhookDelivery, WebhookSubscription, Event)
            .join(WebhookSubscription, WebhookSubscription.id == WebhookDelivery.subscription_id)
            .join(Event, Event.id == WebhookDelivery.event_id)
            .where(WebhookDelivery.id == delivery_id)
        ).one_or_none()
        if row is None:
            return Outcome("missing", 0)
        delivery, subscription, event = row
        if delivery.status != _PENDING:
            return Outcome(delivery.status, delivery.attempts, delivery.last_status_code)
        if not subscription.active:
            delivery.status = DeliveryStatus.failed.value
            delivery.last_error = "the subscription was deleted"
            delivery.next_attempt_at = None
            return Outcome(delivery.status, delivery.attempts, delivery.last_status_code)
        due = delivery.next_attempt_at
        if due is not None and due > now + DUE_SLACK:  # a duplicate message, or one in flight
            return Outcome(_PENDING, delivery.attempts, delivery.last_status_code)
        number = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == _PENDING,
                WebhookDelivery.attempts == delivery.attempts,
            )
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + IN_FLIGHT)
            .returning(WebhookDelivery.attempts)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if number is None:  # another worker took this attempt
            return Outcome(_PENDING, delivery.attempts + 1, delivery.last_status_code)
        return Attempt(
            delivery.id,
            number,
            subscription.url,
            subscription.secret,
            event.kind,
            event_body(event),
        )


def post_attempt(client: httpx.Client, attempt: Attempt) -> tuple[int | None, str | None]:
    """POST the signed body; returns (HTTP status or None, error or None for a 2xx)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "coreloop-webhooks/1",
        SIGNATURE_HEADER: sign(attempt.secret, attempt.body),
        EVENT_HEADER: attempt.kind,
        DELIVERY_HEADER: str(attempt.delivery_id),
        "X-Coreloop-Attempt": str(attempt.number),
    }
    try:
        with client.stream("POST", attempt.url, content=attempt.body, headers=headers) as response:
            if 200 <= response.status_code < 300:
                return response.status_code, None
            # The receiver's body is never read nor echoed into the log (it may be anything
            # the URL's host serves).
            return response.status_code, f"HTTP {response.status_code}"
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]


def record_attempt(
    sessions: sessionmaker[Session],
    attempt: Attempt,
    status_code: int | None,
    error: str | None,
    now: datetime,
    policy: RetryPolicy,
    *,
    give_up: bool = False,
) -> Outcome:
    """Write the attempt's result into the delivery row (only the attempt's owner can);
    ``give_up``: a failure no retry can mend (a refused address)."""
    retry_in = None
    values: dict[str, object] = {"last_status_code": status_code, "last_error": error}
    if error is None:
        values.update(status=DeliveryStatus.delivered.value, delivered_at=now, next_attempt_at=None)
    elif give_up or attempt.number >= policy.max_attempts:
        values.update(status=DeliveryStatus.failed.value, next_attempt_at=None)
    else:
        retry_in = policy.delay(attempt.number)
        values.update(status=_PENDING, next_attempt_at=now + timedelta(seconds=retry_in))
    with unit_of_work(sessions) as session:
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == attempt.delivery_id,
                WebhookDelivery.attempts == attempt.number,
                WebhookDelivery.status == _PENDING,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    return Outcome(str(values["status"]), attempt.number, status_code, retry_in)


def _refusal(url: str, allow_private: bool) -> tuple[str, bool] | None:
    """Why nothing may be sent to ``url`` now, and whether that is final (a refused address;
    a name that does not resolve is retried); None when it may be sent."""
    try:
        check_destination(url, allow_private)
    except AddressRefused as exc:
        return exc.detail[:500], True
    except OSError as exc:
        return f"DNS: {exc}"[:500], False
    return None


def guarded_client(allow_private: bool) -> httpx.Client:
    """The HTTP client of deliveries: it connects only to public addresses unless
    ``allow_private`` (and ignores proxy variables, so the check is on the receiver)."""
    client = httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False, trust_env=False)
    if not allow_private:
        transport = client._transport
        assert isinstance(transport, httpx.HTTPTransport)
        old = transport._pool
        transport._pool = httpcore.ConnectionPool(
            ssl_context=old._ssl_context, network_backend=GuardedBackend()
        )
        old.close()
    return client


def deliver(
    sessions: sessionmaker[Session],
    delivery_id: int,
    *,
    allow_private: bool = False,
    now: datetime | None = None,
    client: httpx.Client | None = None,
    policy: RetryPolicy | None = None,
) -> Outcome:
    """One attempt of one delivery (claim, check the address, POST, record); ``now`` fixes the
    clock for tests. Private addresses only with ``allow_private``."""
    claimed = claim_attempt(sessions, delivery_id, now or utcnow())
    if isinstance(claimed, Outcome):
        return claimed
    refusal = _refusal(claimed.url, allow_private)
    if refusal is not None:
        why, final = refusal
        log.warning("webhook delivery %s attempt %s: %s", delivery_id, claimed.number, why)
        return record_attempt(
            sessions, claimed, None, why, now or utcnow(), policy or RetryPolicy(), give_up=final
        )
    if client is None:
        with guarded_client(allow_private) as own:
            status_code, error = post_attempt(own, claimed)
    else:
        status_code, error = post_attempt(client, claimed)
    if error is not None:
        log.warning("webhook delivery %s attempt %s: %s", delivery_id, claimed.number, error)
    return record_attempt(
        sessions, claimed, status_code, error, now or utcnow(), policy or RetryPolicy()
    )


def run_delivery(settings: Settings, delivery_id: int, *, now: datetime | None = None) -> Outcome:
    """The task's body: one attempt, then a message for the next one when it is to be retried."""
    engine = make_engine(settings)
    try:
        outcome = deliver(
            make_sessionmaker(engine),
            delivery_id,
            allow_private=settings.webhook_allow_private,
            now=now,
        )
    finally:
        engine.dispose()
    if outcome.retry_in is not None:
        send_deliveries(settings, [delivery_id], countdown=outcome.retry_in)
    return outcome


def overdue_deliveries(
    sessions: sessionmaker[Session],
    now: datetime,
    *,
    grace: timedelta = SWEEP_GRACE,
    limit: int = 500,
) -> list[int]:
    """Pending deliveries whose attempt was due more than ``grace`` ago (a message was lost)."""
    cutoff = now - grace
    with unit_of_work(sessions) as session:
        return list(
            session.scalars(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.status == _PENDING,
                    or_(
                        WebhookDelivery.next_attempt_at <= cutoff,
                        WebhookDelivery.next_attempt_at.is_(None)
                        & (WebhookDelivery.created_at <= cutoff),
                    ),
                )
                .order_by(WebhookDelivery.id)
                .limit(limit)
            )
        )


@app.task(
    name=WEBHOOK_DELIVER,
    acks_late=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=5,
    retry_backoff_max=120,
    max_retries=5,
)
def deliver_webhook_task(delivery_id: int) -> str:
    """One attempt of a delivery (a duplicate message finds nothing due and reschedules)."""
    return run_delivery(get_settings(), int(delivery_id)).status


@app.task(name=WEBHOOK_SWEEP, autoretry_for=TRANSIENT_ERRORS, max_retries=1)
def sweep_webhooks_task() -> int:
    """Re-send the messages of overdue pending deliveries; returns how many."""
    settings = get_settings()
    engine = make_engine(settings)
    try:
        ids = overdue_deliveries(make_sessionmaker(engine), utcnow())
    finally:
        engine.dispose()
    send_deliveries(settings, ids, expires=SWEEP_EVERY_SECONDS)
    return len(ids)
