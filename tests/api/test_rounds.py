"""Rounds: creation (202 / 409), reading, the learning curve, cancel, automatic rounds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import Image, ModelVersion, Project, Round, Split
from tests.api.test_queue import add_items, add_round, get_queue

Headers = dict[str, str]


def _error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def _start(client: TestClient, headers: Headers, project: Project) -> Any:
    return client.post("/rounds", json={"project_id": project.id}, headers=headers)


def _set_status(db: Session, round_id: int, status: str) -> None:
    db.execute(update(Round).where(Round.id == round_id).values(status=status))
    db.commit()


def test_create_round_answers_202_then_409_while_active(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    admin_headers: Headers,
) -> None:
    project = make_project(strategy="confident_coreset", alpha=0.3, budget_count=7)
    first = _start(client, admin_headers, project)
    assert first.status_code == 202, first.text
    body = first.json()
    assert (body["status"], body["number"], body["budget"]) == ("queued", 0, 7)
    assert (body["strategy"], body["alpha"], body["model_version_id"]) == (
        "confident_coreset",
        0.3,
        None,
    )
    assert body["requested_by"] is not None and body["created_at"]

    assert _error(_start(client, admin_headers, project)) == (409, "RoundAlreadyActive")
    _set_status(db, body["id"], "training")
    assert _error(_start(client, admin_headers, project)) == (409, "RoundAlreadyActive")
    _set_status(db, body["id"], "done")
    second = _start(client, admin_headers, project)
    assert (second.status_code, second.json()["number"]) == (202, 1)


def test_budget_fraction_is_resolved_against_the_pool(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    project = make_project(budget_count=None, budget_fraction=0.4)
    for split in [Split.pool, Split.pool, Split.pool, Split.test]:
        make_image(project, split=split.value)
    response = _start(client, admin_headers, project)
    assert (response.status_code, response.json()["budget"]) == (202, 2)  # ceil(0.4 * 3)


def test_round_errors(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project()
    assert _error(_start(client, annotator_headers, project)) == (403, "Forbidden")
    missing = client.post("/rounds", json={"project_id": 999_999}, headers=admin_headers)
    assert _error(missing) == (404, "ProjectNotFound")
    assert _error(client.get("/rounds/999999", headers=admin_headers)) == (404, "RoundNotFound")
    cancel = client.post("/rounds/999999/cancel", headers=admin_headers)
    assert _error(cancel) == (404, "RoundNotFound")
    no_budget = make_project(budget_count=None, budget_fraction=None)
    assert _error(_start(client, admin_headers, no_budget)) == (422, "BudgetNotSet")


def test_get_and_list_rounds_give_the_learning_curve(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    annotator_headers: Headers,
) -> None:
    project = make_project()
    done = add_round(db, project, 0)
    db.execute(
        update(Round)
        .where(Round.id == done.id)
        .values(labeled_count=40, metrics={"test": {"accuracy": 0.7}, "epochs": []})
    )
    version = ModelVersion(project_id=project.id, round_id=done.id, checkpoint_key="k", sha256="s")
    db.add(version)
    db.commit()
    running = add_round(db, project, 1, status="training")

    one = client.get(f"/rounds/{done.id}", headers=annotator_headers)
    assert one.status_code == 200
    assert (one.json()["model_version_id"], one.json()["test_metrics"]) == (
        version.id,
        {"accuracy": 0.7},
    )
    listed = client.get("/rounds", params={"project_id": project.id}, headers=annotator_headers)
    assert [(r["number"], r["labeled_count"], r["test_metrics"]) for r in listed.json()] == [
        (0, 40, {"accuracy": 0.7}),
        (1, None, None),
    ]
    assert listed.json()[1]["id"] == running.id


def test_cancel_a_queued_round_at_once_and_a_running_one_by_request(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project()
    queued = _start(client, admin_headers, project).json()
    assert _error(client.post(f"/rounds/{queued['id']}/cancel", headers=annotator_headers)) == (
        403,
        "Forbidden",
    )
    cancelled = client.post(f"/rounds/{queued['id']}/cancel", headers=admin_headers)
    assert cancelled.status_code == 200
    assert (cancelled.json()["status"], cancelled.json()["finished_at"] is not None) == (
        "cancelled",
        True,
    )
    again = client.post(f"/rounds/{queued['id']}/cancel", headers=admin_headers)
    assert _error(again) == (409, "RoundNotActive")

    running = _start(client, admin_headers, project).json()
    _set_status(db, running["id"], "scoring")
    requested = client.post(f"/rounds/{running['id']}/cancel", headers=admin_headers)
    assert requested.status_code == 200
    assert (requested.json()["status"], requested.json()["cancel_requested"]) == ("scoring", True)


def _label_all(client: TestClient, headers: Headers, project: Project, prefix: str) -> int:
    entries = get_queue(client, headers, project)
    for i, entry in enumerate(entries):
        response = client.post(
            "/labels",
            json={
                "image_id": entry["image_id"],
                "lease_id": entry["lease_id"],
                "idempotency_key": f"{prefix}-{i}",
                "class_index": 0,
            },
            headers=headers,
        )
        assert response.status_code == 201, response.text
    return len(entries)


def _rounds(db: Session, project: Project) -> list[tuple[int, str]]:
    rows = db.execute(
        select(Round.number, Round.status)
        .where(Round.project_id == project.id)
        .order_by(Round.number)
    )
    return [(number, status) for number, status in rows]


def test_auto_round_when_the_batch_is_done(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> None:
    project = make_project(auto_round="batch_done")
    images = [make_image(project) for _ in range(3)]
    add_items(db, project, add_round(db, project, 0), images)

    entries = get_queue(client, annotator_headers, project, limit=2)
    for i, entry in enumerate(entries):
        client.post(
            "/labels",
            json={
                "image_id": entry["image_id"],
                "lease_id": entry["lease_id"],
                "idempotency_key": f"b-{i}",
                "class_index": 1,
            },
            headers=annotator_headers,
        )
    assert _rounds(db, project) == [(0, "done")]
    assert _label_all(client, annotator_headers, project, "c") == 1
    assert _rounds(db, project) == [(0, "done"), (1, "queued")]


@pytest.mark.parametrize("previous", [None, "done", "failed"])
def test_auto_round_every_n_labels(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
    previous: str | None,
) -> None:
    project = make_project(auto_round="every_n", auto_round_every=3)
    images = [make_image(project) for _ in range(4)]
    if previous is not None:
        rnd = add_round(db, project, 0, status=previous)
        db.execute(update(Round).where(Round.id == rnd.id).values(label_snapshot_id=0))
        db.commit()
    for i, image in enumerate(images[:2]):
        body = {"image_id": image.id, "idempotency_key": f"n-{i}", "class_index": 0}
        assert client.post("/labels", json=body, headers=annotator_headers).status_code == 201
    before = _rounds(db, project)
    body = {"image_id": images[2].id, "idempotency_key": "n-2", "class_index": 0}
    assert client.post("/labels", json=body, headers=annotator_headers).status_code == 201
    after = _rounds(db, project)

    assert before == ([] if previous is None else [(0, previous)])
    if previous == "failed":  # automatic rounds only follow done ones
        assert after == before
    else:
        assert after == [*before, (len(before), "queued")]
