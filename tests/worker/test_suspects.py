"""Suspect labels (issue 15): agreed labels that out-of-sample predictions contradict."""

from __future__ import annotations

import uuid

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Label, ModelVersion, Prediction, ReviewItem, Role, Round, User
from app.storage import Storage
from tests.worker.conftest import seed_project
from worker.suspects import find_suspects, flag_suspects


def test_find_suspects_names_the_flipped_labels() -> None:
    rng = np.random.default_rng(0)
    truth = np.arange(60) % 3
    probs = np.full((60, 3), 0.05)
    probs[np.arange(60), truth] = 0.9
    probs += rng.uniform(0, 0.02, probs.shape)
    probs /= probs.sum(axis=1, keepdims=True)
    labels = truth.copy()
    flipped = [4, 17, 33]
    labels[flipped] = (labels[flipped] + 1) % 3
    assert sorted(find_suspects(labels, probs)) == flipped


def test_agreed_labels_contradicted_by_predictions_go_to_review(
    sessions: sessionmaker[Session], file_storage: Storage
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=30, n_test=3, overlap=2)
    flipped = set(seeded.pool[:3])
    with unit_of_work(sessions) as session:
        readers = [User(name=f"r-{uuid.uuid4().hex[:6]}", role=Role.annotator.value,
                        token_hash=uuid.uuid4().hex) for _ in range(2)]  # fmt: skip
        session.add_all(readers)
        rnd = Round(project_id=seeded.project_id, number=0, status="done", strategy="random",
                    alpha=0.25, budget=5, progress={}, metrics={})  # fmt: skip
        session.add(rnd)
        session.flush()
        version = ModelVersion(project_id=seeded.project_id, round_id=rnd.id,
                               checkpoint_key="models/x.pt", sha256="0" * 64)  # fmt: skip
        session.add(version)
        session.flush()
        for image_id in seeded.pool:
            true = seeded.classes[image_id]
            probs = [0.05, 0.05, 0.05]
            probs[true] = 0.9
            session.add(Prediction(model_version_id=version.id, image_id=image_id,
                                   class_probs=probs))  # fmt: skip
            given = (true + 1) % 3 if image_id in flipped else true
            for reader in readers:  # both readers agree, on the wrong class for 3 images
                session.add(Label(project_id=seeded.project_id, image_id=image_id,
                                  author_id=reader.id, class_index=given,
                                  idempotency_key=uuid.uuid4().hex))  # fmt: skip
    assert flag_suspects(sessions, seeded.project_id, None) == 3
    with unit_of_work(sessions) as session:
        items = session.scalars(select(ReviewItem).order_by(ReviewItem.image_id)).all()
        assert {i.image_id for i in items} == flipped
        assert all(i.reason == "suspect" and i.detail["confidence"] > 0.8 for i in items)
    assert flag_suspects(sessions, seeded.project_id, None) == 0  # reviewed (or open) already
