"""The one rule for an image's current label (``app.labels.consensus``, issue 15)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.labels.consensus import (
    CurrentLabel,
    Disputed,
    Read,
    current_labels,
    decide,
    disputed_images,
)
from app.labels.kinds import KINDS
from app.models import Image, Project, Role, User

CLS, SEG = KINDS["classification"], KINDS["segmentation"]


def _read(label_id: int, author: int | None, cls: int | None = None, mask: str | None = None,
          authoritative: bool = False) -> Read:  # fmt: skip
    return Read(label_id, 7, author, cls, mask, authoritative)


def test_one_reader_takes_the_newest_label_whoever_wrote_it() -> None:
    got = decide([_read(3, 1, 0), _read(5, 2, 1), _read(4, 1, 2)], overlap=1, kind=CLS)
    assert got == CurrentLabel(7, 1, (), (5,), "single")


def test_several_readers_wait_for_k_reads_one_per_reader() -> None:
    # Reader 1 twice: still one read; k = 2 needs another reader.
    assert decide([_read(1, 1, 0), _read(2, 1, 1)], overlap=2, kind=CLS) is None
    got = decide([_read(1, 1, 0), _read(2, 1, 1), _read(3, 2, 1)], overlap=2, kind=CLS)
    assert got == CurrentLabel(7, 1, (), (2, 3), "agreed")  # reader 1's newest read counts


def test_majority_and_ties() -> None:
    got = decide([_read(1, 1, 0), _read(2, 2, 1), _read(3, 3, 1)], overlap=3, kind=CLS)
    assert isinstance(got, CurrentLabel) and (got.class_index, got.state) == (1, "majority")
    tie = decide([_read(1, 1, 0), _read(2, 2, 1)], overlap=2, kind=CLS)
    assert tie == Disputed(7, (1, 2), (0, 1))


def test_an_admin_or_import_label_settles() -> None:
    reads = [_read(1, 1, 0), _read(2, 2, 1), _read(3, None, 2, authoritative=True)]
    assert decide(reads, overlap=2, kind=CLS) == CurrentLabel(7, 2, (), (3,), "settled")


def test_masks_are_combined_from_every_read() -> None:
    got = decide([_read(1, 1, mask="a"), _read(2, 2, mask="b")], overlap=2, kind=SEG)
    assert got == CurrentLabel(7, None, ("a", "b"), (1, 2), "agreed")
    assert decide([], overlap=2, kind=CLS) is None


def _label(client: TestClient, token: str, image: Image, key: str, cls: int) -> None:
    body = {"image_id": image.id, "idempotency_key": key, "class_index": cls}
    response = client.post("/labels", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("overlap", [1, 2])
def test_current_labels_of_a_project(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    overlap: int,
) -> None:
    project = make_project(overlap=overlap, classes=["a", "b", "c"])
    agreed, split, alone = (make_image(project) for _ in range(3))
    _, t1 = make_user("r1")
    _, t2 = make_user("r2")
    _, admin = make_user("boss", Role.admin)
    _label(client, t1, agreed, "1", 2)
    _label(client, t2, agreed, "2", 2)
    _label(client, t1, split, "3", 0)
    _label(client, t2, split, "4", 1)
    _label(client, t1, alone, "5", 1)
    found = current_labels(db, project)
    classes = {image_id: c.class_index for image_id, c in found.items()}
    detail = client.get(f"/projects/{project.id}", headers={"Authorization": f"Bearer {admin}"})
    assert detail.json()["counts"]["labeled"] == len(classes)
    if overlap == 1:
        assert classes == {agreed.id: 2, split.id: 1, alone.id: 1}
        assert disputed_images(db, project) == []
    else:
        assert classes == {agreed.id: 2}
        assert [d.image_id for d in disputed_images(db, project)] == [split.id]
        _label(client, admin, split, "6", 0)  # an admin settles it
        found = current_labels(db, project)
        assert found[split.id].class_index == 0 and found[split.id].state == "settled"
        assert disputed_images(db, project) == []
    # Up to a label id: the snapshot a round trains on.
    first_two = current_labels(db, project, up_to=min(c.label_id for c in found.values()))
    assert set(first_two) <= {agreed.id}
