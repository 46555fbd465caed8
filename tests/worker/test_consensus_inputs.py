"""With several readers a round trains on consensus labels only (issue 15)."""

from __future__ import annotations

import uuid

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Label, Role, User
from app.storage import Storage
from tests.worker.conftest import png, seed_project
from worker.inputs import _masks, read_round_rows
from worker.records import Claim


def _readers(sessions: sessionmaker[Session], n: int) -> list[int]:
    with unit_of_work(sessions) as session:
        users = [
            User(
                name=f"reader-{uuid.uuid4().hex[:6]}",
                role=Role.annotator.value,
                token_hash=uuid.uuid4().hex,
            )  # fmt: skip
            for _ in range(n)
        ]
        session.add_all(users)
        session.flush()
        return [u.id for u in users]


def _read(sessions: sessionmaker[Session], project_id: int, image_id: int, author: int,
          *, cls: int | None = None, mask_key: str | None = None) -> int:  # fmt: skip
    with unit_of_work(sessions) as session:
        label = Label(
            project_id=project_id,
            image_id=image_id,
            author_id=author,
            class_index=cls,
            mask_key=mask_key,
            idempotency_key=uuid.uuid4().hex,
        )
        session.add(label)
        session.flush()
        return label.id


def _claim(project_id: int, snapshot: int) -> Claim:
    return Claim(
        round_id=0, project_id=project_id, number=1, attempt=1, strategy="random", alpha=0.25,
        budget=5, label_snapshot_id=snapshot, labeled_count=0,
    )  # fmt: skip


def test_only_consensus_labels_count(
    sessions: sessionmaker[Session], file_storage: Storage
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=6, n_test=2, overlap=2)
    a, b = _readers(sessions, 2)
    agreed, split, single = seeded.pool[:3]
    _read(sessions, seeded.project_id, agreed, a, cls=1)
    _read(sessions, seeded.project_id, agreed, b, cls=1)
    _read(sessions, seeded.project_id, split, a, cls=0)
    _read(sessions, seeded.project_id, split, b, cls=2)
    last = _read(sessions, seeded.project_id, single, a, cls=2)
    rows = read_round_rows(sessions, _claim(seeded.project_id, last))
    # The test split's labels are imports: they settle their images.
    assert set(rows.labels) == {agreed, *seeded.test}
    assert rows.labels[agreed].class_index == 1
    assert [rows.pool[i].id for i in rows.labeled_pool()] == [agreed]


def test_masks_of_several_readers_are_their_per_pixel_majority(
    sessions: sessionmaker[Session], file_storage: Storage
) -> None:
    seeded = seed_project(sessions, file_storage, task="segmentation", n_pool=3, n_test=1,
                          overlap=3)  # fmt: skip
    readers = _readers(sessions, 3)
    image = seeded.pool[0]
    masks = [np.zeros((32, 32), np.uint8) for _ in range(3)]
    masks[0][:, :20] = 255  # columns 0-19
    masks[1][:, 10:] = 255  # columns 10-31
    masks[2][:, 15:25] = 255  # columns 15-24
    last = 0
    for reader, mask in zip(readers, masks, strict=True):
        key = f"masks/{seeded.project_id}/{uuid.uuid4().hex}.png"
        file_storage.put_bytes(key, png(mask))
        last = _read(sessions, seeded.project_id, image, reader, mask_key=key)
    rows = read_round_rows(sessions, _claim(seeded.project_id, last))
    combined = _masks(file_storage, [rows.labels[image]], 32)[0]
    votes = np.sum([m > 0 for m in masks], axis=0)
    assert np.array_equal(combined, (votes >= 2).astype(np.uint8))
    assert combined[:, 10:25].all() and not combined[:, :10].any() and not combined[:, 25:].any()
