"""POST /activelearning/{strategy}: MONAI Label's next-sample call, answered from the queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Image, Lease, Project, QueueItem, Role, User
from tests.api.test_queue import add_items, add_round

Headers = dict[str, str]


@pytest.fixture
def queued(
    db: Session, make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> tuple[Project, list[Image], list[QueueItem]]:
    project = make_project()
    images = [make_image(project) for _ in range(2)]
    items = add_items(db, project, add_round(db, project), images[::-1])  # rank 0: images[1]
    return project, images, items


def sample(client: TestClient, headers: Headers, strategy: str, **body: Any) -> Any:
    return client.post(f"/activelearning/{strategy}", json=body, headers=headers)


def test_next_sample_is_the_queue_head_leased_to_the_caller(
    client: TestClient,
    db: Session,
    queued: tuple[Project, list[Image], list[QueueItem]],
    annotator_headers: Headers,
) -> None:
    project, images, items = queued
    response = sample(
        client, annotator_headers, project.strategy, project_id=project.id, client_id="slicer"
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == str(images[1].id) and body["image_id"] == images[1].id
    assert body["name"] == images[1].filename
    assert body["path"] == body["url"] == f"/images/{images[1].id}/file"
    assert body["checksum"] == f"SHA256:{images[1].sha256}"
    assert body["weight"] == pytest.approx(0.75)
    assert (body["strategy"], body["round"], body["rank"]) == (project.strategy, 0, 0)
    lease = db.get(Lease, body["lease_id"])
    assert lease is not None and (lease.image_id, lease.state) == (images[1].id, "active")
    assert lease.queue_item_id == items[0].id


def test_asking_again_returns_the_held_sample(
    client: TestClient,
    queued: tuple[Project, list[Image], list[QueueItem]],
    annotator_headers: Headers,
) -> None:
    project, _, _ = queued
    first = sample(client, annotator_headers, "first", project_id=project.id).json()
    second = sample(client, annotator_headers, "random", project_id=project.id).json()
    assert (second["id"], second["lease_id"]) == (first["id"], first["lease_id"])


def test_two_annotators_get_different_samples_then_nothing_is_left(
    client: TestClient,
    db: Session,
    queued: tuple[Project, list[Image], list[QueueItem]],
    annotator_headers: Headers,
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project, _, _ = queued
    _, token = make_user("second", Role.annotator)
    _, third_token = make_user("third", Role.annotator)
    first = sample(client, annotator_headers, "first", project_id=project.id).json()
    second = sample(client, {"Authorization": f"Bearer {token}"}, "first", project_id=project.id)
    third = sample(
        client, {"Authorization": f"Bearer {third_token}"}, "first", project_id=project.id
    )

    assert second.status_code == 200 and second.json()["id"] != first["id"]
    assert (third.status_code, third.json()["error"]) == (404, "NoSampleLeft")
    assert len(db.scalars(select(Lease.id).where(Lease.project_id == project.id)).all()) == 2


@pytest.mark.parametrize(
    ("strategy", "body", "status", "code"),
    [
        ("entropy", {}, 404, "StrategyNotFound"),
        ("first", {"project_id": 999_999}, 404, "ProjectNotFound"),
        ("first", {"project_id": "abc"}, 422, "ValidationError"),
    ],
)
def test_errors_use_the_envelope(
    client: TestClient,
    queued: tuple[Project, list[Image], list[QueueItem]],
    annotator_headers: Headers,
    strategy: str,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    project, _, _ = queued
    response = sample(client, annotator_headers, strategy, **{"project_id": project.id, **body})
    assert (response.status_code, response.json()["error"]) == (status, code)
    if code == "StrategyNotFound":
        assert project.strategy in response.json()["detail"]


def test_an_empty_queue_is_404(
    client: TestClient, make_project: Callable[..., Project], annotator_headers: Headers
) -> None:
    project = make_project()
    response = sample(client, annotator_headers, "random", project_id=project.id)
    assert (response.status_code, response.json()["error"]) == (404, "NoSampleLeft")


def test_needs_a_token(
    client: TestClient, queued: tuple[Project, list[Image], list[QueueItem]]
) -> None:
    project, _, _ = queued
    response = sample(client, {}, "first", project_id=project.id)
    assert (response.status_code, response.json()["error"]) == (401, "Unauthorized")
