"""The reviewer's queue (issue 15): what goes in, leasing, settling, sending back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.labels.consensus import current_labels
from app.labels.masks import mask_to_rle
from app.models import Image, Project, QueueItem, ReviewItem, Role, User, utcnow
from tests.api.test_queue import add_items, add_round

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _label(client: TestClient, token: str, image: Image, key: str, **content: Any) -> int:
    body = {"image_id": image.id, "idempotency_key": key, **content}
    response = client.post("/labels", json=body, headers=_h(token))
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _review(client: TestClient, token: str, project: Project, limit: int = 50) -> Any:
    response = client.get(
        "/review", params={"project_id": project.id, "limit": limit}, headers=_h(token)
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_disputed_reads_reach_the_reviewer_who_settles_them(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2, classes=["benign", "malignant"])
    images = [make_image(project) for _ in range(20)]
    _, token_a = make_user("reader-a")
    _, token_b = make_user("reader-b")
    _, reviewer = make_user("rev", Role.reviewer)
    reads: dict[int, int] = {}
    for i, image in enumerate(images):
        _label(client, token_a, image, f"a{i}", class_index=i % 2)
        reads[image.id] = _label(client, token_b, image, f"b{i}", class_index=(i % 2) ^ (i < 5))
    assert len(current_labels(db, project)) == 15  # the 5 ties wait
    queue = _review(client, reviewer, project)
    assert sorted(e["image_id"] for e in queue) == sorted(i.id for i in images[:5])
    assert all(e["reason"] == "disputed" and len(e["reads"]) == 2 for e in queue)
    assert {r["author_name"] for r in queue[0]["reads"]} == {"reader-a", "reader-b"}
    for entry in queue:  # keep reader b's read
        body = {"label_id": reads[entry["image_id"]]}
        settled = client.post(f"/review/{entry['id']}/settle", json=body, headers=_h(reviewer))
        assert settled.status_code == 200, settled.text
        assert settled.json()["state"] == "settled"
    assert _review(client, reviewer, project) == []
    found = current_labels(db, project)
    assert len(found) == 20
    assert all(found[i.id].state == "settled" for i in images[:5])
    assert [found[i.id].class_index for i in images[:5]] == [1, 0, 1, 0, 1]
    again = client.post(f"/review/{queue[0]['id']}/settle", json={"class_index": 0},
                        headers=_h(reviewer))  # fmt: skip
    assert again.status_code == 409 and again.json()["error"] == "ReviewNotOpen"


def test_annotators_and_outsiders_get_no_review_items(
    client: TestClient,
    make_project: Callable[..., Project],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2)
    _, annotator = make_user("a")
    _, outsider = make_user("o", Role.reviewer, member=False)
    params = {"project_id": project.id}
    refused = client.get("/review", params=params, headers=_h(annotator))
    assert (refused.status_code, refused.json()["error"]) == (403, "ReviewersOnly")
    assert client.get("/review", params=params, headers=_h(outsider)).status_code == 404


def test_leases_skips_and_expiry(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2)
    images = [make_image(project) for _ in range(3)]
    _, a = make_user("a")
    _, b = make_user("b")
    _, r1 = make_user("r1", Role.reviewer)
    _, r2 = make_user("r2", Role.reviewer)
    for i, image in enumerate(images):
        _label(client, a, image, f"a{i}", class_index=0)
        _label(client, b, image, f"b{i}", class_index=1)
    first = _review(client, r1, project, limit=2)
    assert len(first) == 2
    assert [e["id"] for e in _review(client, r1, project, limit=2)] == [e["id"] for e in first]
    second = _review(client, r2, project, limit=5)
    assert len(second) == 1 and second[0]["id"] not in {e["id"] for e in first}
    taken = client.post(f"/review/{first[0]['id']}/settle", json={"class_index": 0},
                        headers=_h(r2))  # fmt: skip
    assert taken.json()["error"] == "ReviewLeasedByOther"
    # r2 skips its item: never offered to r2 again, free for r1.
    assert client.post(f"/review/{second[0]['id']}/skip", headers=_h(r2)).status_code == 200
    assert _review(client, r2, project) == []
    assert {e["id"] for e in _review(client, r1, project, limit=5)} == {
        *(e["id"] for e in first), second[0]["id"]}  # fmt: skip
    # An expired lease frees the item.
    db.execute(update(ReviewItem).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    db.commit()
    assert {e["id"] for e in _review(client, r2, project)} == {e["id"] for e in first}


def test_send_back_asks_another_reader(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2)
    image = make_image(project)
    add_items(db, project, add_round(db, project), [image])
    tokens = [make_user(f"r{i}")[1] for i in range(3)]
    _, reviewer = make_user("rev", Role.reviewer)
    for i, token in enumerate(tokens[:2]):
        lease = client.get("/queue", params={"project_id": project.id}, headers=_h(token)).json()
        _label(client, token, image, f"k{i}", class_index=i, lease_id=lease[0]["lease_id"])
    (entry,) = _review(client, reviewer, project)
    sent = client.post(f"/review/{entry['id']}/settle", json={"send_back": True},
                       headers=_h(reviewer))  # fmt: skip
    assert sent.json()["state"] == "sent_back"
    assert db.scalar(select(QueueItem.labels_needed).where(QueueItem.image_id == image.id)) == 1
    # The two readers are not offered it again; the third reads it and breaks the tie.
    for token in tokens[:2]:
        assert (
            client.get("/queue", params={"project_id": project.id}, headers=_h(token)).json() == []
        )
    lease = client.get("/queue", params={"project_id": project.id}, headers=_h(tokens[2])).json()
    _label(client, tokens[2], image, "k2", class_index=1, lease_id=lease[0]["lease_id"])
    found = current_labels(db, project)
    assert (found[image.id].class_index, found[image.id].state) == (1, "majority")
    assert _review(client, reviewer, project) == []


def _disc_mask(shift: int) -> np.ndarray:
    mask = np.zeros((24, 32), dtype=bool)
    mask[4:20, 4 + shift : 20 + shift] = True
    return mask


@pytest.mark.parametrize(("shift", "disputed"), [(1, False), (10, True)])
def test_masks_below_the_dice_threshold_are_disputed(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
    shift: int,
    disputed: bool,
) -> None:
    project = make_project(overlap=2, task="segmentation", classes=["lesion"], mask_agreement=0.7)
    image = make_image(project)
    for i, s in enumerate((0, shift)):
        _label(client, make_user(f"m{i}")[1], image, f"m{i}", mask_rle=mask_to_rle(_disc_mask(s)))
    queue = client.get("/review", params={"project_id": project.id}, headers=admin_headers).json()
    # Dice of two 16 x 16 squares shifted by 1: 2 * 240 / 512 = 0.94; by 10: 0.375.
    assert len(queue) == int(disputed)
    assert (image.id in current_labels(db, project)) is not disputed
    if disputed:
        assert queue[0]["detail"]["lowest_dice"] == pytest.approx(0.375)
        body = {"mask_rle": mask_to_rle(_disc_mask(5))}
        settled = client.post(f"/review/{queue[0]['id']}/settle", json=body, headers=admin_headers)
        assert settled.status_code == 200, settled.text
        assert current_labels(db, project)[image.id].state == "settled"


def test_spot_checks_draw_agreed_images(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
) -> None:
    project = make_project(overlap=2, review_sample=1.0)
    image = make_image(project)
    for i in range(2):
        _label(client, make_user(f"s{i}")[1], image, f"s{i}", class_index=1)
    queue = client.get("/review", params={"project_id": project.id}, headers=admin_headers).json()
    assert [(e["image_id"], e["reason"]) for e in queue] == [(image.id, "spot_check")]


def test_settle_takes_exactly_one_choice(client: TestClient, admin_headers: dict[str, str]) -> None:
    both = client.post("/review/1/settle", json={"class_index": 0, "send_back": True},
                       headers=admin_headers)  # fmt: skip
    assert both.status_code == 422
    missing = client.post("/review/999/settle", json={"class_index": 0}, headers=admin_headers)
    assert (missing.status_code, missing.json()["error"]) == (404, "ReviewItemNotFound")
