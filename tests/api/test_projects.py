"""Projects: configuration rules, defaults, roles, PATCH and the counts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Image, Label, Lease, Project, QueueItem, Role, Round, User, utcnow


def _create(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    payload = {"name": "derm", "task": "classification", "classes": ["nv", "mel"], **body}
    return client.post("/projects", json=payload, headers=headers)


def test_classification_defaults(
    client: TestClient, admin_headers: dict[str, str], db: Session
) -> None:
    response = _create(client, admin_headers, budget=20)
    assert response.status_code == 201
    body = response.json()
    assert body["alpha"] == 0.25
    assert body["strategy"] == "confident_coreset"
    assert body["budget"] == 20
    assert body["initial_fraction"] == 0.10
    assert (body["overlap"], body["lease_ttl_seconds"], body["require_lease"]) == (1, 600, False)
    assert (body["auto_round"], body["auto_round_every"]) == ("off", None)
    assert (body["image_size"], body["epochs"], body["batch_size"]) == (64, 10, 32)
    assert body["learning_rate"] is None
    assert body["counts"] == {
        "images": {"pool": 0, "val": 0, "test": 0},
        "labeled": 0,
        "queued": 0,
        "leased": 0,
        "rounds": 0,
    }
    row = db.get(Project, body["id"])
    assert row is not None
    assert (row.budget_count, row.budget_fraction) == (20, None)


def test_segmentation_defaults_and_fraction_budget(
    client: TestClient, admin_headers: dict[str, str], db: Session
) -> None:
    response = client.post(
        "/projects",
        json={"name": "masks", "task": "segmentation", "budget": 0.05, "alpha": 0},
        headers=admin_headers,
    )
    assert response.status_code == 201
    body = response.json()
    assert body["classes"] == ["lesion"]
    assert body["alpha"] == 0.0  # an explicit 0 is kept, not replaced by the default
    assert body["budget"] == 0.05
    row = db.get(Project, body["id"])
    assert row is not None
    assert (row.budget_count, row.budget_fraction) == (None, 0.05)
    default = client.post(
        "/projects", json={"name": "masks2", "task": "segmentation"}, headers=admin_headers
    )
    assert default.json()["alpha"] == 0.5


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"classes": ["only"]}, "InvalidProjectConfig"),
        ({"classes": None}, "InvalidProjectConfig"),
        ({"classes": ["nv", "NV"]}, "InvalidProjectConfig"),
        ({"task": "segmentation", "classes": ["a", "b"]}, "InvalidProjectConfig"),
        ({"auto_round": "every_n"}, "InvalidProjectConfig"),
        ({"budget": 0}, "ValidationError"),
        ({"budget": 1.0}, "ValidationError"),
        ({"budget": 1.5}, "ValidationError"),
        ({"budget": True}, "ValidationError"),
        ({"budget": "10"}, "ValidationError"),
        ({"initial_fraction": 0}, "ValidationError"),
        ({"initial_fraction": 1.2}, "ValidationError"),
        ({"strategy": "magic"}, "ValidationError"),
        ({"alpha": 1.5}, "ValidationError"),
        ({"overlap": 0}, "ValidationError"),
        ({"lease_ttl_seconds": 5}, "ValidationError"),
        ({"auto_round": "hourly"}, "ValidationError"),
        ({"task": "detection"}, "ValidationError"),
        ({"classes": ["nv", ""]}, "ValidationError"),
        ({"name": " "}, "ValidationError"),
        ({"epochs": 0}, "ValidationError"),
        ({"batch_size": 1}, "ValidationError"),
        ({"learning_rate": -0.1}, "ValidationError"),
        ({"colour": "blue"}, "ValidationError"),
    ],
)
def test_bad_config_is_422(
    client: TestClient, admin_headers: dict[str, str], body: dict[str, Any], error: str
) -> None:
    response = _create(client, admin_headers, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == error
    assert response.json()["detail"]


@pytest.mark.parametrize(
    "strategy",
    [
        "random",
        "entropy",
        "coreset",
        "learning_loss",
        "confident_coreset",
        "cc_sum",
        "cc_rank",
        "sequential",
    ],
)
def test_every_strategy_name_is_accepted(
    client: TestClient, admin_headers: dict[str, str], strategy: str
) -> None:
    response = _create(client, admin_headers, strategy=strategy)
    assert response.status_code == 201
    assert response.json()["strategy"] == strategy


def test_duplicate_name_is_409(client: TestClient, admin_headers: dict[str, str]) -> None:
    assert _create(client, admin_headers).status_code == 201
    response = _create(client, admin_headers, name=" derm ")
    assert response.status_code == 409
    assert response.json()["error"] == "ProjectExists"


def test_only_admins_create_or_patch(
    client: TestClient, annotator_headers: dict[str, str], make_project: Callable[..., Project]
) -> None:
    assert _create(client, annotator_headers).status_code == 403
    assert _create(client, {}).status_code == 401
    project = make_project()
    response = client.patch(
        f"/projects/{project.id}", json={"alpha": 0.1}, headers=annotator_headers
    )
    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden"


def test_annotators_read_projects(
    client: TestClient, annotator_headers: dict[str, str], make_project: Callable[..., Project]
) -> None:
    first, second = make_project(name="a"), make_project(name="b")
    listed = client.get("/projects", headers=annotator_headers).json()
    assert [p["name"] for p in listed] == ["a", "b"]
    assert listed[0]["budget"] == 4
    detail = client.get(f"/projects/{second.id}", headers=annotator_headers).json()
    assert detail["id"] == second.id and detail["counts"]["rounds"] == 0
    assert first.id != second.id


def test_unknown_project_is_404(client: TestClient, annotator_headers: dict[str, str]) -> None:
    response = client.get("/projects/999999", headers=annotator_headers)
    assert response.status_code == 404
    assert response.json()["error"] == "ProjectNotFound"


def test_patch_changes_only_what_is_sent(
    client: TestClient, admin_headers: dict[str, str], db: Session
) -> None:
    created = _create(client, admin_headers, budget=10, learning_rate=0.01).json()
    changes = {
        "budget": 0.1,
        "strategy": "coreset",
        "alpha": 1,
        "overlap": 3,
        "lease_ttl_seconds": 60,
        "require_lease": True,
        "auto_round": "every_n",
        "auto_round_every": 25,
        "image_size": 128,
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": None,
    }
    response = client.patch(f"/projects/{created['id']}", json=changes, headers=admin_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    for name, value in changes.items():
        assert body[name] == value, name
    assert (body["name"], body["classes"]) == (created["name"], created["classes"])
    row = db.get(Project, created["id"])
    assert row is not None
    db.refresh(row)
    assert (row.budget_count, row.budget_fraction) == (None, 0.1)
    again = client.patch(f"/projects/{created['id']}", json={"budget": 7}, headers=admin_headers)
    assert again.json()["budget"] == 7 and again.json()["strategy"] == "coreset"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"task": "segmentation"}, "ValidationError"),
        ({"classes": ["a", "b", "c"]}, "ValidationError"),
        ({"strategy": "magic"}, "ValidationError"),
        ({"budget": 0}, "ValidationError"),
        ({"strategy": None}, "InvalidProjectConfig"),
        ({"auto_round": "every_n"}, "InvalidProjectConfig"),
    ],
)
def test_bad_patch_is_422_and_changes_nothing(
    client: TestClient,
    admin_headers: dict[str, str],
    make_project: Callable[..., Project],
    body: dict[str, Any],
    error: str,
) -> None:
    project = make_project()
    response = client.patch(f"/projects/{project.id}", json=body, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["error"] == error
    after = client.get(f"/projects/{project.id}", headers=admin_headers).json()
    assert (after["strategy"], after["auto_round"]) == ("confident_coreset", "off")


def test_patch_unknown_project_is_404(client: TestClient, admin_headers: dict[str, str]) -> None:
    response = client.patch("/projects/424242", json={"alpha": 0.3}, headers=admin_headers)
    assert response.status_code == 404


def _queue_item(
    db: Session, project: Project, rnd: Round, image: Image, rank: int, needed: int
) -> QueueItem:
    item = QueueItem(
        project_id=project.id, image_id=image.id, round_id=rnd.id, rank=rank, labels_needed=needed
    )
    db.add(item)
    db.flush()
    return item


def _lease(db: Session, item: QueueItem, user: User, state: str, expires_in: float) -> None:
    db.add(
        Lease(
            queue_item_id=item.id,
            project_id=item.project_id,
            image_id=item.image_id,
            user_id=user.id,
            state=state,
            expires_at=utcnow() + timedelta(seconds=expires_in),
        )
    )


def test_counts(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    user, token = make_user("counter", Role.annotator)
    project, other = make_project(), make_project()
    pool = [make_image(project) for _ in range(4)]
    test = [make_image(project, split="test") for _ in range(2)]
    make_image(project, split="val")
    make_image(other)
    for image, key in [(pool[0], "a"), (pool[0], "b"), (pool[1], "c"), (test[0], "d")]:
        db.add(Label(project_id=project.id, image_id=image.id, class_index=0, idempotency_key=key))
    rnd = Round(
        project_id=project.id, number=1, status="done", strategy="random", alpha=0.25, budget=3
    )
    db.add(rnd)
    db.flush()
    items = [
        _queue_item(db, project, rnd, pool[i], i, needed) for i, needed in [(1, 0), (2, 1), (3, 2)]
    ]
    _lease(db, items[1], user, "active", 300)
    _lease(db, items[2], user, "active", -5)  # expired: free again
    _lease(db, items[0], user, "done", 300)
    db.commit()
    counts = client.get(
        f"/projects/{project.id}", headers={"Authorization": f"Bearer {token}"}
    ).json()["counts"]
    assert counts == {
        "images": {"pool": 4, "val": 1, "test": 2},
        "labeled": 2,
        "queued": 2,
        "leased": 1,
        "rounds": 1,
    }
