"""Webhook subscriptions and the delivery log through the API, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Image, Project
from app.settings import Settings
from app.webhooks.service import record_event

Headers = dict[str, str]
URL = "http://127.0.0.1:9/hook"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """Loopback URLs (``URL``) are private: allowed here as CORELOOP_WEBHOOK_ALLOW_PRIVATE=1
    does (the default policy: tests/api/test_webhook_policy.py)."""
    return settings.model_copy(update={"webhook_allow_private": True})


def subscribe(client: TestClient, headers: Headers, project_id: int, **body: Any) -> Any:
    payload = {"url": URL, "events": ["label.created"], **body}
    return client.post(f"/projects/{project_id}/webhooks", json=payload, headers=headers)


def test_the_secret_is_shown_once(
    client: TestClient, make_project: Callable[..., Project], admin_headers: Headers
) -> None:
    project = make_project()
    generated = subscribe(client, admin_headers, project.id, events=["round.done", "label.created"])
    given = subscribe(client, admin_headers, project.id, secret="s" * 20)
    listed = client.get(f"/projects/{project.id}/webhooks", headers=admin_headers)

    assert generated.status_code == 201, generated.text
    assert generated.json()["secret"].startswith("whsec_")
    assert len(generated.json()["secret"]) > 30
    assert generated.json()["events"] == ["label.created", "round.done"]
    assert given.json()["secret"] == "s" * 20
    assert [w["id"] for w in listed.json()] == [generated.json()["id"], given.json()["id"]]
    assert all("secret" not in w for w in listed.json())


@pytest.mark.parametrize(
    "body",
    [
        {"events": ["label.deleted"]},
        {"events": []},
        {"url": "ftp://example.org/hook"},
        {"secret": "short"},
        {"unknown": 1},
    ],
)
def test_invalid_subscriptions_are_refused(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    body: dict[str, Any],
) -> None:
    response = subscribe(client, admin_headers, make_project().id, **body)
    assert (response.status_code, response.json()["error"]) == (422, "ValidationError")


def test_webhooks_are_for_admins_of_existing_projects(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project()
    as_annotator = subscribe(client, annotator_headers, project.id)
    missing = subscribe(client, admin_headers, 999_999)
    listing = client.get(f"/projects/{project.id}/webhooks", headers=annotator_headers)
    assert (as_annotator.status_code, listing.status_code) == (403, 403)
    assert (missing.status_code, missing.json()["error"]) == (404, "ProjectNotFound")


def test_delete_deactivates_and_keeps_the_log(
    client: TestClient, make_project: Callable[..., Project], admin_headers: Headers
) -> None:
    project, other = make_project(), make_project()
    created = subscribe(client, admin_headers, project.id).json()
    base = f"/projects/{project.id}/webhooks"

    wrong_project = client.delete(
        f"/projects/{other.id}/webhooks/{created['id']}", headers=admin_headers
    )
    deleted = client.delete(f"{base}/{created['id']}", headers=admin_headers)
    again = client.delete(f"{base}/{created['id']}", headers=admin_headers)
    active = client.get(base, headers=admin_headers).json()
    every = client.get(base, params={"include_inactive": True}, headers=admin_headers).json()
    log = client.get(f"{base}/{created['id']}/deliveries", headers=admin_headers)

    assert (wrong_project.status_code, wrong_project.json()["error"]) == (404, "WebhookNotFound")
    assert (deleted.status_code, again.status_code) == (204, 204)
    assert active == []
    assert [(w["id"], w["active"]) for w in every] == [(created["id"], False)]
    assert (log.status_code, log.json()) == (200, [])


def test_the_delivery_log(
    client: TestClient,
    db: Session,
    settings: Settings,
    make_project: Callable[..., Project],
    admin_headers: Headers,
) -> None:
    project = make_project()
    hook = subscribe(client, admin_headers, project.id, events=["round.done"]).json()
    for number in range(3):
        record_event(
            db,
            settings,
            project_id=project.id,
            actor_id=None,
            kind="round.done",
            payload={"round_id": number},
        )
    record_event(
        db, settings, project_id=project.id, actor_id=None, kind="label.created", payload={}
    )
    db.commit()  # a plain commit: the rows are stored, nothing is sent to a broker
    base = f"/projects/{project.id}/webhooks/{hook['id']}/deliveries"

    log = client.get(base, headers=admin_headers).json()
    page = client.get(base, params={"limit": 1, "before_id": log[0]["id"]}, headers=admin_headers)
    delivered = client.get(base, params={"status": "delivered"}, headers=admin_headers)

    assert [d["event_kind"] for d in log] == ["round.done"] * 3
    assert [d["id"] for d in log] == sorted((d["id"] for d in log), reverse=True)
    assert {(d["status"], d["attempts"], d["last_status_code"]) for d in log} == {
        ("pending", 0, None)
    }
    assert [d["id"] for d in page.json()] == [log[1]["id"]]
    assert delivered.json() == []


def test_a_new_label_is_delivered_to_subscribers(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project()
    image = make_image(project)
    hook = subscribe(client, admin_headers, project.id).json()
    label = {"image_id": image.id, "idempotency_key": "k", "class_index": 1}
    assert client.post("/labels", json=label, headers=annotator_headers).status_code == 201

    log = client.get(
        f"/projects/{project.id}/webhooks/{hook['id']}/deliveries", headers=admin_headers
    ).json()
    assert [d["event_kind"] for d in log] == ["label.created"]
