"""Rounds reach the broker by task name, after the commit only (real brokers, no eager mode)."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.deps import AdminUser, SessionDep, SettingsDep
from app.errors import Conflict
from app.models import Project, Round
from app.rounds.service import create_round
from app.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/15"  # a database of its own, flushed by these tests


def _broker_file(settings: Settings) -> Path:
    assert settings.broker_url is not None and settings.broker_url.startswith("sqla+sqlite:///")
    return Path(settings.broker_url.removeprefix("sqla+sqlite:///"))


def _sqlite_broker_messages(settings: Settings) -> list[dict[str, Any]]:
    """Every message of the embedded broker: its task name, queue and decoded body."""
    path = _broker_file(settings)
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id"
        ).fetchall()
    messages = []
    for queue, payload in rows:
        envelope = json.loads(payload)
        body = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"queue": queue, "task": envelope["headers"]["task"], "args": body[0]})
    return messages


def _start_round(client: TestClient, headers: dict[str, str], project: Project) -> Any:
    return client.post("/rounds", json={"project_id": project.id}, headers=headers)


def test_post_rounds_leaves_one_message_in_the_embedded_broker(
    client: TestClient,
    settings: Settings,
    make_project: Callable[..., Project],
    admin_headers: dict[str, str],
) -> None:
    project = make_project()
    created = _start_round(client, admin_headers, project)
    refused = _start_round(client, admin_headers, project)

    assert (created.status_code, refused.status_code) == (202, 409)
    assert _sqlite_broker_messages(settings) == [
        {"queue": "training", "task": "round.run", "args": [created.json()["id"]]}
    ]


def test_a_rolled_back_request_sends_nothing(
    app: FastAPI,
    db: Session,
    settings: Settings,
    make_project: Callable[..., Project],
    admin_headers: dict[str, str],
) -> None:
    def round_then_fail(
        project_id: int, session: SessionDep, app_settings: SettingsDep, admin: AdminUser
    ) -> None:
        create_round(session, app_settings, project_id, admin.id)
        raise Conflict("failing after the round was written", code="TestFailure")

    app.add_api_route("/test/round-then-fail", round_then_fail, methods=["POST"])
    project = make_project()
    with TestClient(app) as client:
        response = client.post(
            "/test/round-then-fail", params={"project_id": project.id}, headers=admin_headers
        )

    assert response.status_code == 409
    assert db.scalar(select(func.count(Round.id)).where(Round.project_id == project.id)) == 0
    assert _sqlite_broker_messages(settings) == []


def test_an_unreachable_broker_does_not_fail_the_committed_request(
    client: TestClient,
    db: Session,
    settings: Settings,
    make_project: Callable[..., Project],
    admin_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    project = make_project()
    response = _start_round(client, admin_headers, project)

    assert response.status_code == 202
    assert db.scalar(select(Round.status).where(Round.id == response.json()["id"])) == "queued"
    assert "could not send round" in caplog.text


@pytest.fixture
def redis_broker(settings: Settings) -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    settings.broker_url = REDIS_URL
    try:
        yield REDIS_URL
    finally:
        client.flushdb()
        client.close()


@pytest.mark.redis
def test_post_rounds_reaches_redis(
    client: TestClient,
    redis_broker: str,
    make_project: Callable[..., Project],
    admin_headers: dict[str, str],
) -> None:
    project = make_project()
    created = _start_round(client, admin_headers, project)
    assert created.status_code == 202

    with Connection(redis_broker) as conn, conn.SimpleQueue("training") as queue:
        message = queue.get(timeout=5)
        message.ack()
        assert message.headers["task"] == "round.run"
        assert message.payload[0] == [created.json()["id"]]
    assert redis.Redis.from_url(redis_broker).llen("training") == 0  # exactly one message
