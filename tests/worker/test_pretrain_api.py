"""The warm start's HTTP surface: start (admin, 202 / 409), read, cancel, restart, and the
project option that queues it with the first round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Event, Project, Round, WarmStart

Headers = dict[str, str]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The warm starts sent to the worker (after the commit)."""
    from app.warm_start import service as warm_start

    ids: list[int] = []
    monkeypatch.setattr(warm_start, "send_warm_start", lambda settings, wid: ids.append(wid))
    return ids


def _error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def _path(project: Project, suffix: str = "") -> str:
    return f"/projects/{project.id}/warm-start{suffix}"


def _set(db: Session, project: Project, **values: Any) -> None:
    db.execute(update(WarmStart).where(WarmStart.project_id == project.id).values(**values))
    db.commit()


def test_start_read_cancel_restart(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    annotator_headers: Headers,
    sent: list[int],
) -> None:
    project = make_project()
    assert _error(client.get(_path(project), headers=admin_headers)) == (404, "WarmStartNotFound")
    assert client.post(_path(project), headers=annotator_headers).status_code == 403

    started = client.post(_path(project), headers=admin_headers)
    assert started.status_code == 202, started.text
    body = started.json()
    assert (body["project_id"], body["status"], body["attempt"]) == (project.id, "queued", 0)
    assert sent == [body["id"]]
    assert _error(client.post(_path(project), headers=admin_headers)) == (409, "WarmStartActive")

    _set(db, project, status="training", progress={"phase": "training", "epoch": 2, "epochs": 5})
    read = client.get(_path(project), headers=annotator_headers).json()
    assert read["progress"] == {"phase": "training", "epoch": 2, "epochs": 5}
    assert client.post(_path(project, "/cancel"), headers=annotator_headers).status_code == 403
    cancel = client.post(_path(project, "/cancel"), headers=admin_headers)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    assert cancel.json()["status"] == "training"  # the worker stops itself

    _set(db, project, status="cancelled")
    assert _error(client.post(_path(project, "/cancel"), headers=admin_headers)) == (
        409,
        "WarmStartNotActive",
    )
    again = client.post(_path(project), headers=admin_headers)
    assert again.status_code == 202
    assert again.json()["status"] == "queued" and again.json()["cancel_requested"] is False
    assert again.json()["id"] == body["id"] and sent == [body["id"], body["id"]]

    queued_cancel = client.post(_path(project, "/cancel"), headers=admin_headers)
    assert queued_cancel.json()["status"] == "cancelled"  # never claimed: at once

    _set(db, project, status="done", checkpoint_key=f"models/{project.id}/warm-start.pt")
    assert _error(client.post(_path(project), headers=admin_headers)) == (409, "WarmStartDone")
    kinds = db.scalars(
        select(Event.kind).where(Event.project_id == project.id).order_by(Event.id)
    ).all()
    assert list(kinds) == [
        "warm_start.queued",
        "warm_start.cancel_requested",
        "warm_start.queued",
        "warm_start.cancelled",
    ]


def test_unknown_project_is_404(client: TestClient, admin_headers: Headers) -> None:
    assert client.post("/projects/999999/warm-start", headers=admin_headers).status_code == 404
    assert client.get("/projects/999999/warm-start", headers=admin_headers).status_code == 404


def test_project_option_queues_it_once_with_the_first_round(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    sent: list[int],
) -> None:
    plain = make_project()
    assert client.post("/rounds", json={"project_id": plain.id}, headers=admin_headers).is_success
    assert client.get(_path(plain), headers=admin_headers).status_code == 404
    assert sent == []

    created = client.post(
        "/projects",
        json={"name": "warm", "task": "classification", "classes": ["a", "b"], "warm_start": True},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["warm_start"] is True
    project_id = created.json()["id"]
    first = client.post("/rounds", json={"project_id": project_id}, headers=admin_headers)
    assert first.status_code == 202
    warm = client.get(f"/projects/{project_id}/warm-start", headers=admin_headers).json()
    assert warm["status"] == "queued" and sent == [warm["id"]]
    db.execute(update(WarmStart).where(WarmStart.id == warm["id"]).values(status="done"))
    db.commit()
    db.execute(update(Round).where(Round.project_id == project_id).values(status="done"))
    db.commit()
    second = client.post("/rounds", json={"project_id": project_id}, headers=admin_headers)
    assert second.status_code == 202
    assert sent == [warm["id"]]  # once per project
    patched = client.patch(
        f"/projects/{project_id}", json={"warm_start": False}, headers=admin_headers
    )
    assert patched.status_code == 200 and patched.json()["warm_start"] is False
