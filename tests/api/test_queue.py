"""GET /queue and the lease lifecycle, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.models import (
    Image,
    Lease,
    ModelVersion,
    Prediction,
    Project,
    QueueItem,
    Role,
    Round,
    User,
    utcnow,
)
from app.settings import Settings

Headers = dict[str, str]


def add_round(db: Session, project: Project, number: int = 0, status: str = "done") -> Round:
    """A round row as the worker leaves it (the worker is not under test here)."""
    row = Round(
        project_id=project.id,
        number=number,
        status=status,
        strategy=project.strategy,
        alpha=project.alpha,
        budget=4,
        progress={},
        metrics={},
    )
    db.add(row)
    db.commit()
    return row


def add_items(
    db: Session, project: Project, rnd: Round, images: list[Image], ranks: list[int] | None = None
) -> list[QueueItem]:
    """Queue items for ``images`` (ranks 0.. unless given), each wanting ``overlap`` labels."""
    items = [
        QueueItem(
            project_id=project.id,
            image_id=image.id,
            round_id=rnd.id,
            rank=rank,
            min_distance=0.5,
            predicted_loss=1.5,
            score=0.75,
            labels_needed=project.overlap,
        )
        for image, rank in zip(images, ranks or list(range(len(images))), strict=True)
    ]
    db.add_all(items)
    db.commit()
    return items


@pytest.fixture
def queue_setup(
    db: Session, make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> Callable[..., tuple[Project, list[QueueItem]]]:
    """``queue_setup(n, **project_fields)``: a project with one done round of n items."""

    def factory(n: int = 3, **fields: Any) -> tuple[Project, list[QueueItem]]:
        project = make_project(**fields)
        images = [make_image(project) for _ in range(n)]
        return project, add_items(db, project, add_round(db, project), images)

    return factory


@pytest.fixture
def annotators(make_user: Callable[..., tuple[User, str]]) -> list[tuple[User, Headers]]:
    users = [make_user(f"annotator-{i}", Role.annotator) for i in range(3)]
    return [(user, {"Authorization": f"Bearer {token}"}) for user, token in users]


def get_queue(client: TestClient, headers: Headers, project: Project, limit: int = 10) -> Any:
    response = client.get(
        "/queue", params={"project_id": project.id, "limit": limit}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_queue_entries_in_round_then_rank_order(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> None:
    project = make_project()
    first, second = add_round(db, project, 0), add_round(db, project, 1)
    images = [make_image(project) for _ in range(6)]
    add_items(db, project, second, images[:3], ranks=[2, 0, 1])
    add_items(db, project, first, images[3:], ranks=[1, 2, 0])

    entries = get_queue(client, annotator_headers, project)

    assert [(e["round"], e["rank"]) for e in entries] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    entry = entries[0]
    assert entry["image_id"] == images[5].id
    assert entry["image_url"] == f"/images/{images[5].id}/file"
    assert entry["scores"] == {"min_distance": 0.5, "predicted_loss": 1.5, "score": 0.75}
    assert entry["prediction"] is None
    assert entry["lease_id"] > 0 and entry["expires_at"]


def test_own_active_leases_come_first_and_are_not_leased_twice(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
) -> None:
    project, items = queue_setup(4)
    first = get_queue(client, annotator_headers, project, limit=2)
    again = get_queue(client, annotator_headers, project, limit=3)

    assert [e["queue_item_id"] for e in first] == [items[0].id, items[1].id]
    assert [e["lease_id"] for e in again[:2]] == [e["lease_id"] for e in first]
    assert again[2]["queue_item_id"] == items[2].id
    assert get_queue(client, annotator_headers, project, limit=1) == again[:1]


def _lose_candidates(monkeypatch: pytest.MonkeyPatch, passes: int) -> list[int]:
    """Make the first ``passes`` lease inserts insert nothing, as when another annotator leased
    each locked candidate a moment before it was counted again (contention on PostgreSQL)."""
    from sqlalchemy.engine import Connection

    from app.queue import service

    real = Connection.execute
    lost: list[int] = []

    def execute(self: Connection, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        if statement is service._LEASE_IF_STILL_FREE and len(lost) < passes:
            lost.extend(parameters["item_ids"])
            parameters = {**parameters, "item_ids": [-1]}
        return real(self, statement, parameters, **kw)

    monkeypatch.setattr(Connection, "execute", execute)
    return lost


def test_lost_candidates_never_make_an_empty_answer_while_items_are_free(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An empty queue reads as "All done for now" on the annotator's page: it must mean that no
    item is free, not that a few passes lost their candidates to other annotators."""
    from app.queue.service import _MAX_PASSES

    project, items = queue_setup(_MAX_PASSES + 4)
    lost = _lose_candidates(monkeypatch, _MAX_PASSES + 2)
    (entry,) = get_queue(client, annotator_headers, project, limit=1)
    assert lost == [item.id for item in items[: _MAX_PASSES + 2]]
    assert entry["queue_item_id"] == items[_MAX_PASSES + 2].id
    # With every candidate lost, the passes end when no unseen candidate is left.
    lost = _lose_candidates(monkeypatch, 100)
    assert (
        get_queue(client, annotator_headers, project, limit=1)[0]["lease_id"] == entry["lease_id"]
    )  # held: offered again without a pass
    other, _ = queue_setup(3)
    assert get_queue(client, annotator_headers, other, limit=1) == []
    assert len(lost) == 3


@pytest.mark.parametrize("overlap", [1, 2])
def test_an_item_is_leased_to_at_most_overlap_annotators(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
    overlap: int,
) -> None:
    project, items = queue_setup(3, overlap=overlap)
    got = [get_queue(client, headers, project) for _, headers in annotators]

    for i, entries in enumerate(got):
        expected = [item.id for item in items] if i < overlap else []
        assert [e["queue_item_id"] for e in entries] == expected
    counts = db.execute(
        select(Lease.queue_item_id, Lease.user_id).where(Lease.project_id == project.id)
    ).all()
    assert len(counts) == overlap * len(items)
    assert len(set(counts)) == len(counts)  # distinct annotators per item


def test_expired_leases_are_free_again(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
) -> None:
    project, items = queue_setup(2)
    (first, first_headers), (_, second_headers) = annotators[:2]
    assert len(get_queue(client, first_headers, project)) == 2
    assert get_queue(client, second_headers, project) == []

    db.execute(
        update(Lease).where(Lease.user_id == first.id).values(expires_at=utcnow() - timedelta(1))
    )
    db.commit()

    assert [e["queue_item_id"] for e in get_queue(client, second_headers, project)] == [
        item.id for item in items
    ]
    assert get_queue(client, first_headers, project) == []


def test_limit_is_capped_by_the_server(
    client: TestClient,
    settings: Settings,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
) -> None:
    project, _ = queue_setup(5)
    settings.queue_max_limit = 2
    assert len(get_queue(client, annotator_headers, project, limit=50)) == 2
    response = client.get(
        "/queue", params={"project_id": project.id, "limit": 0}, headers=annotator_headers
    )
    assert response.status_code == 422


def test_items_fully_labeled_or_labeled_by_the_caller_are_not_offered(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
) -> None:
    project, items = queue_setup(3, overlap=2)
    (_, first_headers), (_, second_headers) = annotators[:2]
    db.execute(update(QueueItem).where(QueueItem.id == items[0].id).values(labels_needed=0))
    db.commit()
    response = client.post(
        "/labels",
        json={"image_id": items[1].image_id, "idempotency_key": "k1", "class_index": 0},
        headers=first_headers,
    )
    assert response.status_code == 201

    assert [e["queue_item_id"] for e in get_queue(client, first_headers, project)] == [items[2].id]
    assert [e["queue_item_id"] for e in get_queue(client, second_headers, project)] == [
        items[1].id,
        items[2].id,
    ]


def test_queue_carries_the_newest_model_prediction(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
) -> None:
    project, items = queue_setup(2)
    rnd = db.scalars(select(Round).where(Round.project_id == project.id)).one()
    old = ModelVersion(project_id=project.id, round_id=rnd.id, checkpoint_key="c/0", sha256="0")
    db.add(old)
    db.commit()
    newer_round = add_round(db, project, 1)
    newer = ModelVersion(
        project_id=project.id, round_id=newer_round.id, checkpoint_key="c/1", sha256="1"
    )
    db.add(newer)
    db.commit()
    first, second = items[0].image_id, items[1].image_id
    db.add_all(
        [
            Prediction(model_version_id=old.id, image_id=first, class_probs=[1, 0]),
            Prediction(model_version_id=newer.id, image_id=first, class_probs=[0.25, 0.75]),
            Prediction(model_version_id=old.id, image_id=second, class_probs=[1, 0]),
        ]
    )
    db.commit()

    entries = get_queue(client, annotator_headers, project)

    assert entries[0]["prediction"] == {
        "model_version_id": newer.id,
        "class_probs": [0.25, 0.75],
        "mask_url": None,
    }
    assert entries[1]["prediction"] is None
    assert get_queue(client, annotator_headers, project) == entries  # held: the same, predicted


def test_predictions_come_with_the_first_read_and_for_items_of_later_passes(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first pass's candidates and the held leases get their predictions in the statement
    that reads them; only items found by a later pass (after candidates were lost to other
    annotators) are read for predictions on their own."""
    from app.queue import service

    project, items = queue_setup(4)
    rnd = db.scalars(select(Round).where(Round.project_id == project.id)).one()
    model = ModelVersion(project_id=project.id, round_id=rnd.id, checkpoint_key="c/0", sha256="0")
    db.add(model)
    db.commit()
    db.add_all(
        Prediction(model_version_id=model.id, image_id=item.image_id, class_probs=[i, 1 - i])
        for i, item in enumerate(items)
    )
    db.commit()
    asked: list[list[int]] = []
    real = service._predictions

    def recording(conn: Any, model_version_id: int | None, image_ids: list[int]) -> Any:
        asked.append(image_ids)
        return real(conn, model_version_id, image_ids)

    monkeypatch.setattr(service, "_predictions", recording)

    (first,) = get_queue(client, annotator_headers, project, limit=1)
    assert first["prediction"]["class_probs"] == [0, 1] and asked == [[]]
    lost = _lose_candidates(monkeypatch, 1)
    second, third = get_queue(client, annotator_headers, project, limit=3)
    assert lost == [items[1].id, items[2].id]  # the first pass lost both
    assert second == first  # held
    assert third["queue_item_id"] == items[3].id  # found by the second pass
    assert third["prediction"]["class_probs"] == [3, -2]
    assert asked[-1] == [items[3].image_id]


def test_queue_of_an_unknown_project_and_without_a_token(
    client: TestClient, annotator_headers: Headers
) -> None:
    response = client.get("/queue", params={"project_id": 999_999}, headers=annotator_headers)
    assert response.status_code == 404
    assert response.json()["error"] == "ProjectNotFound"
    assert client.get("/queue", params={"project_id": 1}).status_code == 401


def _lease(client: TestClient, headers: Headers, project: Project) -> dict[str, Any]:
    entries = get_queue(client, headers, project, limit=1)
    assert entries
    return dict(entries[0])


def test_renew_extends_an_active_lease(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
) -> None:
    project, _ = queue_setup(1, lease_ttl_seconds=60)
    entry = _lease(client, annotator_headers, project)
    response = client.post(f"/leases/{entry['lease_id']}/renew", headers=annotator_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "active"
    assert body["expires_at"] >= entry["expires_at"]


def test_renew_errors(
    client: TestClient,
    db: Session,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
) -> None:
    project, _ = queue_setup(2)
    (_, mine), (_, other) = annotators[:2]
    lease_id = _lease(client, mine, project)["lease_id"]

    unknown = client.post("/leases/999999/renew", headers=mine)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "LeaseNotFound")
    foreign = client.post(f"/leases/{lease_id}/renew", headers=other)
    assert (foreign.status_code, foreign.json()["error"]) == (403, "LeaseNotYours")

    db.execute(update(Lease).where(Lease.id == lease_id).values(expires_at=utcnow()))
    db.commit()
    expired = client.post(f"/leases/{lease_id}/renew", headers=mine)
    assert (expired.status_code, expired.json()["error"]) == (409, "LeaseExpired")

    released = _lease(client, mine, project)["lease_id"]
    assert client.post(f"/leases/{released}/release", headers=mine).status_code == 200
    inactive = client.post(f"/leases/{released}/renew", headers=mine)
    assert (inactive.status_code, inactive.json()["error"]) == (409, "LeaseNotActive")


def test_release_gives_the_item_back(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
) -> None:
    project, items = queue_setup(1)
    (_, mine), (_, other) = annotators[:2]
    lease_id = _lease(client, mine, project)["lease_id"]
    assert get_queue(client, other, project) == []

    response = client.post(f"/leases/{lease_id}/release", headers=mine)
    assert (response.status_code, response.json()["state"]) == (200, "released")
    again = client.post(f"/leases/{lease_id}/release", headers=mine)
    assert (again.status_code, again.json()["state"]) == (200, "released")

    assert [e["queue_item_id"] for e in get_queue(client, other, project)] == [items[0].id]
    foreign = client.post(f"/leases/{lease_id}/release", headers=other)
    assert foreign.status_code == 403


def test_skip_is_never_offered_again_to_the_caller(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotators: list[tuple[User, Headers]],
) -> None:
    project, items = queue_setup(1)
    (_, mine), (_, other) = annotators[:2]
    lease_id = _lease(client, mine, project)["lease_id"]

    response = client.post(f"/leases/{lease_id}/skip", headers=mine)
    assert (response.status_code, response.json()["state"]) == (200, "skipped")

    assert get_queue(client, mine, project) == []
    assert [e["queue_item_id"] for e in get_queue(client, other, project)] == [items[0].id]


def test_a_done_lease_cannot_be_released_or_skipped(
    client: TestClient,
    queue_setup: Callable[..., tuple[Project, list[QueueItem]]],
    annotator_headers: Headers,
) -> None:
    project, items = queue_setup(1)
    entry = _lease(client, annotator_headers, project)
    label = client.post(
        "/labels",
        json={
            "image_id": entry["image_id"],
            "lease_id": entry["lease_id"],
            "idempotency_key": "done-1",
            "class_index": 1,
        },
        headers=annotator_headers,
    )
    assert label.status_code == 201
    for action in ("release", "skip"):
        response = client.post(f"/leases/{entry['lease_id']}/{action}", headers=annotator_headers)
        assert (response.status_code, response.json()["error"]) == (409, "LeaseNotActive")
