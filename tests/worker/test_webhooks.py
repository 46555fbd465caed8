"""Webhook delivery against a real HTTP receiver, and the fan-out's broker messages.

The task's function is called directly (no eager Celery); the clock of an attempt is passed in,
so the backoff is checked without sleeping. Real commits, SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import hmac
import json
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Project, utcnow
from app.settings import Settings
from app.webhooks.models import WebhookDelivery, WebhookSubscription
from app.webhooks.service import record_event, send_deliveries
from tests.worker.conftest import free_port
from worker import webhooks
from worker.webhooks import Attempt, Outcome, RetryPolicy, claim_attempt, deliver

SECRET = "test-secret-0123456789"


class Receiver:
    """A tiny HTTP server on 127.0.0.1 that answers with ``statuses`` in turn (then 200).

    Loopback is a private address: deliveries to it pass ``allow_private=True`` (what
    ``CORELOOP_WEBHOOK_ALLOW_PRIVATE=1`` does for the worker)."""

    def __init__(self, statuses: list[int], delay: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.delay = delay
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                time.sleep(receiver.delay)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "7")
                self.end_headers()
                self.wfile.write(b"nope!!\n" if status >= 300 else b"thanks\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int] | None = None, delay: float = 0.0) -> Receiver:
        started.append(Receiver(statuses or [], delay))
        return started[-1]

    yield start
    for server in started:
        server.close()


def make_project(sessions: sessionmaker[Session]) -> int:
    with unit_of_work(sessions) as session:
        project = Project(
            name=f"p-{uuid.uuid4().hex[:8]}",
            task="classification",
            classes=["a", "b"],
            alpha=0.25,
            budget_count=2,
        )
        session.add(project)
        session.flush()
        return project.id


def subscribe(
    sessions: sessionmaker[Session],
    project_id: int,
    url: str,
    events: tuple[str, ...] = ("label.created",),
    active: bool = True,
) -> int:
    with unit_of_work(sessions) as session:
        row = WebhookSubscription(
            project_id=project_id, url=url, events=list(events), secret=SECRET, active=active
        )
        session.add(row)
        session.flush()
        return row.id


def emit(
    sessions: sessionmaker[Session],
    settings: Settings,
    project_id: int,
    kind: str = "label.created",
) -> list[int]:
    """Record an event as a service would; returns the ids of its deliveries."""
    with unit_of_work(sessions) as session:
        event = record_event(
            session,
            settings,
            project_id=project_id,
            actor_id=None,
            kind=kind,
            payload={"label_id": 41, "image_id": 7},
        )
        return list(
            session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.event_id == event.id))
        )


def read_delivery(sessions: sessionmaker[Session], delivery_id: int) -> WebhookDelivery:
    with unit_of_work(sessions) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def broker_messages(settings: Settings) -> list[dict[str, Any]]:
    """Every message in the embedded broker's SQLite file: queue, task, args, eta."""
    assert settings.broker_url is not None
    path = Path(settings.broker_url.removeprefix("sqla+sqlite:///"))
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    messages = []
    for queue, payload in rows:
        envelope = json.loads(payload)
        args = json.loads(base64.b64decode(envelope["body"]))[0]
        headers = envelope["headers"]
        messages.append(
            {"queue": queue, "task": headers["task"], "args": args, "eta": headers["eta"]}
            | ({"expires": headers["expires"]} if headers.get("expires") else {})
        )
    return messages


@pytest.fixture
def project_id(sessions: sessionmaker[Session]) -> int:
    return make_project(sessions)


def test_the_receiver_gets_a_signed_body(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    server = receiver()
    subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)

    outcome = deliver(sessions, delivery_id, allow_private=True)

    [(headers, body)] = server.requests
    expected = "sha256=" + hmac.new(SECRET.encode(), body, "sha256").hexdigest()
    assert hmac.compare_digest(headers["X-Coreloop-Signature"], expected)
    assert headers["X-Coreloop-Event"] == "label.created"
    assert headers["X-Coreloop-Delivery"] == str(delivery_id)
    assert headers["Content-Type"] == "application/json"
    sent = json.loads(body)
    assert (sent["event"], sent["project_id"], sent["payload"]) == (
        "label.created",
        project_id,
        {"label_id": 41, "image_id": 7},
    )
    assert outcome == Outcome("delivered", 1, 200, None)
    row = read_delivery(sessions, delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "delivered",
        1,
        200,
        None,
    )
    assert row.delivered_at is not None and row.next_attempt_at is None


def test_two_failures_then_success_with_backoff(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    server = receiver([500, 503])
    subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)
    t0 = utcnow()

    first = deliver(sessions, delivery_id, allow_private=True, now=t0)
    after_first = read_delivery(sessions, delivery_id)
    early = deliver(sessions, delivery_id, allow_private=True, now=t0 + timedelta(seconds=4))
    second = deliver(sessions, delivery_id, allow_private=True, now=t0 + timedelta(seconds=10))
    after_second = read_delivery(sessions, delivery_id)
    third = deliver(sessions, delivery_id, allow_private=True, now=t0 + timedelta(seconds=30))

    assert first == Outcome("pending", 1, 500, 10.0)
    assert after_first.next_attempt_at == t0 + timedelta(seconds=10)
    assert after_first.last_error is not None and after_first.last_error.startswith("HTTP 500")
    assert early == Outcome("pending", 1, 500, None)  # not due: no attempt, no message
    assert second == Outcome("pending", 2, 503, 20.0)
    assert after_second.next_attempt_at == t0 + timedelta(seconds=30)
    assert third == Outcome("delivered", 3, 200, None)
    row = read_delivery(sessions, delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == (
        "delivered",
        3,
        200,
        None,
    )
    assert [h["X-Coreloop-Attempt"] for h, _ in server.requests] == ["1", "2", "3"]
    assert len({body for _, body in server.requests}) == 1  # the same bytes each time
    assert len({h["X-Coreloop-Signature"] for h, _ in server.requests}) == 1


def test_gives_up_after_the_last_attempt(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    server = receiver([500, 410])
    subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)
    policy = RetryPolicy(max_attempts=2)
    t0 = utcnow()

    deliver(sessions, delivery_id, allow_private=True, now=t0, policy=policy)
    last = deliver(
        sessions, delivery_id, allow_private=True, now=t0 + timedelta(seconds=10), policy=policy
    )
    after = deliver(
        sessions, delivery_id, allow_private=True, now=t0 + timedelta(hours=1), policy=policy
    )

    assert last == Outcome("failed", 2, 410, None)
    assert after == Outcome("failed", 2, 410, None)
    assert len(server.requests) == 2


def test_connection_errors_and_timeouts_are_retried(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    slow = receiver(delay=1.0)
    subscribe(sessions, project_id, f"http://127.0.0.1:{free_port()}/nobody-listens")
    subscribe(sessions, project_id, slow.url)
    refused, timed_out = emit(sessions, worker_settings, project_id)

    with httpx.Client(timeout=0.2) as client:
        outcomes = [
            deliver(sessions, d, allow_private=True, client=client) for d in (refused, timed_out)
        ]

    assert [(o.status, o.attempts, o.status_code, o.retry_in) for o in outcomes] == [
        ("pending", 1, None, 10.0)
    ] * 2
    assert (read_delivery(sessions, refused).last_error or "").startswith("ConnectError")
    assert (read_delivery(sessions, timed_out).last_error or "").startswith("ReadTimeout")


def test_a_deleted_subscription_gets_nothing(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    server = receiver()
    subscription_id = subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)
    with unit_of_work(sessions) as session:
        row = session.get(WebhookSubscription, subscription_id)
        assert row is not None
        row.active = False

    assert deliver(sessions, delivery_id, allow_private=True).status == "failed"
    assert server.requests == []
    assert read_delivery(sessions, delivery_id).last_error == "the subscription was deleted"


def test_an_attempt_is_claimed_once(
    sessions: sessionmaker[Session], worker_settings: Settings, project_id: int
) -> None:
    subscribe(sessions, project_id, "http://127.0.0.1:9/hook")
    [delivery_id] = emit(sessions, worker_settings, project_id)
    now = utcnow()

    first = claim_attempt(sessions, delivery_id, now)
    second = claim_attempt(sessions, delivery_id, now)

    assert isinstance(first, Attempt) and first.number == 1
    assert second == Outcome("pending", 1, None, None)
    with unit_of_work(sessions) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None and row.next_attempt_at == now + webhooks.IN_FLIGHT


def test_fan_out_sends_the_task_by_name_after_the_commit(
    sessions: sessionmaker[Session], worker_settings: Settings, project_id: int
) -> None:
    wanted = subscribe(sessions, project_id, "http://127.0.0.1:9/a")
    subscribe(sessions, project_id, "http://127.0.0.1:9/b", events=("round.done",))
    subscribe(sessions, project_id, "http://127.0.0.1:9/c", active=False)
    seen_before_commit: list[dict[str, Any]] = []

    with unit_of_work(sessions) as session:
        event = record_event(
            session,
            worker_settings,
            project_id=project_id,
            actor_id=None,
            kind="label.created",
            payload={},
        )
        seen_before_commit += broker_messages(worker_settings)
        [delivery] = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.event_id == event.id)
        ).all()

    assert seen_before_commit == []
    assert delivery.subscription_id == wanted
    assert broker_messages(worker_settings) == [
        {"queue": "default", "task": "webhook.deliver", "args": [delivery.id], "eta": None}
    ]


def test_a_rolled_back_event_sends_nothing(
    sessions: sessionmaker[Session], worker_settings: Settings, project_id: int
) -> None:
    subscribe(sessions, project_id, "http://127.0.0.1:9/a")
    with pytest.raises(RuntimeError), unit_of_work(sessions) as session:
        record_event(
            session,
            worker_settings,
            project_id=project_id,
            actor_id=None,
            kind="label.created",
            payload={},
        )
        raise RuntimeError("the request failed after the event")

    assert broker_messages(worker_settings) == []
    with unit_of_work(sessions) as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


def test_the_task_function_schedules_its_retry(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    """``run_delivery`` is what ``webhook.deliver`` runs: a failed attempt sends a message
    with a countdown for the next one."""
    server = receiver([502])
    subscribe(sessions, project_id, server.url, events=("round.done",))
    [delivery_id] = emit(sessions, worker_settings, project_id, kind="round.done")
    before = datetime.now().astimezone()

    allowed = worker_settings.model_copy(update={"webhook_allow_private": True})
    outcome = webhooks.run_delivery(allowed, delivery_id)

    assert outcome == Outcome("pending", 1, 502, 10.0)
    [retry] = [m for m in broker_messages(worker_settings) if m["eta"] is not None]
    assert (retry["task"], retry["queue"], retry["args"]) == (
        "webhook.deliver",
        "default",
        [delivery_id],
    )
    delay = (datetime.fromisoformat(retry["eta"]) - before).total_seconds()
    assert 9.0 < delay < 12.0


def test_the_sweep_finds_overdue_deliveries(
    sessions: sessionmaker[Session], worker_settings: Settings, project_id: int
) -> None:
    subscribe(sessions, project_id, "http://127.0.0.1:9/a")
    [overdue] = emit(sessions, worker_settings, project_id)
    [done] = emit(sessions, worker_settings, project_id)
    with unit_of_work(sessions) as session:
        row = session.get(WebhookDelivery, done)
        assert row is not None
        row.status = "delivered"

    later = utcnow() + timedelta(minutes=2)
    assert webhooks.overdue_deliveries(sessions, utcnow()) == []
    assert webhooks.overdue_deliveries(sessions, later) == [overdue]

    send_deliveries(worker_settings, [overdue], expires=webhooks.SWEEP_EVERY_SECONDS)
    [resent] = [m for m in broker_messages(worker_settings) if "expires" in m]
    assert (resent["task"], resent["args"]) == ("webhook.deliver", [overdue])


# -- the address policy at delivery time (issue 14, M4) --------------------------------------


def test_a_private_address_gets_nothing_by_default(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    """A loopback URL (stored before the policy, or by SQL) is refused when the worker
    delivers: nothing is sent, and the delivery fails at once."""
    server = receiver()
    subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)

    outcome = webhooks.run_delivery(worker_settings, delivery_id)

    assert (outcome.status, outcome.attempts, outcome.retry_in) == ("failed", 1, None)
    assert server.requests == []
    row = read_delivery(sessions, delivery_id)
    assert "loopback" in (row.last_error or "")


def test_a_name_that_resolves_to_a_private_address_is_refused(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = receiver()
    port = server.url.split(":")[2].split("/")[0]
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "hooks.example.org" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    subscribe(sessions, project_id, f"http://hooks.example.org:{port}/hook")
    [delivery_id] = emit(sessions, worker_settings, project_id)

    assert deliver(sessions, delivery_id).status == "failed"
    assert server.requests == []
    assert "resolves to an address that is a loopback" in (
        read_delivery(sessions, delivery_id).last_error or ""
    )


def test_the_connection_is_checked_too(
    receiver: Callable[..., Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolved to a public address at the check but to a private one when the
    client connects (DNS rebinding) is refused by the client's own check."""
    server = receiver()
    port = server.url.split(":")[2].split("/")[0]
    real = socket.getaddrinfo

    def fake(host: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "rebind.example.org" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with webhooks.guarded_client(allow_private=False) as client, pytest.raises(httpx.ConnectError):
        client.post(f"http://rebind.example.org:{port}/hook", content=b"{}")
    assert server.requests == []
    with webhooks.guarded_client(allow_private=True) as client:
        assert client.post(server.url, content=b"{}").status_code == 200


def test_the_log_never_echoes_the_receivers_body(
    sessions: sessionmaker[Session],
    worker_settings: Settings,
    project_id: int,
    receiver: Callable[..., Receiver],
) -> None:
    server = receiver([500])  # answers "nope!!"
    subscribe(sessions, project_id, server.url)
    [delivery_id] = emit(sessions, worker_settings, project_id)
    deliver(sessions, delivery_id, allow_private=True)
    row = read_delivery(sessions, delivery_id)
    assert (row.last_status_code, row.last_error) == (500, "HTTP 500")
