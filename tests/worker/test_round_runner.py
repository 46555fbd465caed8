"""The round runner in-process (called directly, not through Celery) on tiny synthetic projects:
round 0 (random initial batch), round 1 (train, test metrics, model version, selection,
predictions), a crash before the final transaction, cancel, and bad configurations."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Event, ModelVersion, Prediction, QueueItem, Round, RoundStatus, utcnow
from app.settings import Settings
from app.storage import Storage
from ml.checkpoint import load_checkpoint, model_from_checkpoint
from tests.worker.conftest import Seeded, add_labels, new_round, read_round, seed_project
from worker import reaper, records, rounds
from worker.inputs import RoundEnv


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def env(
    worker_settings: Settings, sessions: sessionmaker[Session], file_storage: Storage
) -> RoundEnv:
    return RoundEnv(worker_settings, sessions, file_storage)


def _queue(sessions: sessionmaker[Session], round_id: int) -> list[QueueItem]:
    with unit_of_work(sessions) as session:
        stmt = select(QueueItem).where(QueueItem.round_id == round_id).order_by(QueueItem.rank)
        return list(session.scalars(stmt).all())


def _versions(sessions: sessionmaker[Session], round_id: int) -> list[ModelVersion]:
    with unit_of_work(sessions) as session:
        return list(session.scalars(select(ModelVersion).where(ModelVersion.round_id == round_id)))


def _predictions(sessions: sessionmaker[Session], version_id: int) -> list[Prediction]:
    with unit_of_work(sessions) as session:
        stmt = select(Prediction).where(Prediction.model_version_id == version_id)
        return list(session.scalars(stmt).all())


def _round_zero(env: RoundEnv, seeded: Seeded) -> list[int]:
    """Run round 0 and label its batch; returns the labeled image ids."""
    round_id = new_round(env.sessions, seeded.project_id, budget=5)
    assert rounds.run_round(round_id, env.settings, env) == "done"
    batch = [item.image_id for item in _queue(env.sessions, round_id)]
    with unit_of_work(env.sessions) as session:  # labeling closes the items, as the API does
        session.execute(
            update(QueueItem).where(QueueItem.round_id == round_id).values(labels_needed=0)
        )
    add_labels(env.sessions, env.storage, seeded, batch)
    return batch


def _check_learning_round(
    env: RoundEnv, seeded: Seeded, round_id: int, labeled: list[int]
) -> ModelVersion:
    row = read_round(env.sessions, round_id)
    assert row.status == RoundStatus.done.value, row.error
    assert row.labeled_count == len(labeled) and row.label_snapshot_id
    assert row.progress["phase"] == "done"
    assert len(row.metrics["history"]) == 2 and row.metrics["test"]["n"] == len(seeded.test)
    queue = _queue(env.sessions, round_id)
    picked = [item.image_id for item in queue]
    assert len(picked) == 5 and len(set(picked)) == 5
    assert not set(picked) & set(labeled) and set(picked) <= set(seeded.pool)
    assert all(item.labels_needed == 1 and item.predicted_loss is not None for item in queue)
    (version,) = _versions(env.sessions, round_id)
    path = env.storage.path(version.checkpoint_key)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == version.sha256
    assert version.metrics["test"] == row.metrics["test"]
    recipe = version.metrics["recipe"]  # the training recipe is recorded with the model
    classification = seeded.task == "classification"
    assert recipe["augment"] == "derm" and recipe["warm_start"] is False
    assert recipe["class_balance"] == ("sampler" if classification else "none")
    assert recipe["loss"] == ("cross_entropy" if classification else "dice_bce")
    assert not env.storage.exists(version.checkpoint_key.replace(".pt", ".resume.pt"))
    model = model_from_checkpoint(load_checkpoint(path))
    assert model.task == seeded.task
    preds = _predictions(env.sessions, version.id)
    assert sorted(p.image_id for p in preds) == sorted(set(seeded.pool) - set(labeled))
    return version


def test_classification_round_zero_then_round_one(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=40, n_test=10, epochs=2)
    labeled = _round_zero(env, seeded)
    assert len(labeled) == 10  # ceil(0.25 * 40), the initial fraction

    round_id = new_round(env.sessions, seeded.project_id, budget=5)
    assert rounds.run_round(round_id, env.settings, env) == "done"
    version = _check_learning_round(env, seeded, round_id, labeled)
    test = read_round(env.sessions, round_id).metrics["test"]
    assert 0.0 <= test["accuracy"] <= 1.0 and len(test["per_class_recall"]) == 3
    for pred in _predictions(env.sessions, version.id):
        assert pred.class_probs is not None and abs(sum(pred.class_probs) - 1) < 1e-4
    with unit_of_work(env.sessions) as session:
        kinds = list(session.scalars(select(Event.kind).order_by(Event.id)))
    assert kinds == ["round.done", "round.done", "model.published"]


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_segmentation_round_zero_then_round_one(env: RoundEnv) -> None:
    seeded = seed_project(
        env.sessions, env.storage, task="segmentation", n_pool=40, n_test=10, epochs=2
    )
    labeled = _round_zero(env, seeded)
    round_id = new_round(env.sessions, seeded.project_id, budget=5)
    assert rounds.run_round(round_id, env.settings, env) == "done"
    version = _check_learning_round(env, seeded, round_id, labeled)
    assert 0.0 <= read_round(env.sessions, round_id).metrics["test"]["jaccard"] <= 1.0
    pred = _predictions(env.sessions, version.id)[0]
    assert pred.mask_key == f"predictions/{version.id}/{pred.image_id}.png"
    mask = np.asarray(PILImage.open(io.BytesIO(env.storage.read_bytes(pred.mask_key))))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_crash_before_the_final_transaction_reruns_once(
    env: RoundEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=40, n_test=10, epochs=2)
    labeled = _round_zero(env, seeded)
    round_id = new_round(env.sessions, seeded.project_id, budget=5)

    class Crash(BaseException):
        """Stands for the process dying: nothing catches it."""

    def crash(*args: object, **kwargs: object) -> str:
        raise Crash

    monkeypatch.setattr(records, "finalize_round", crash)
    with pytest.raises(Crash):
        rounds.run_round(round_id, env.settings, env)
    monkeypatch.undo()
    assert read_round(env.sessions, round_id).status == RoundStatus.selecting.value
    assert len(_versions(env.sessions, round_id)) == 1 and _queue(env.sessions, round_id) == []

    later = utcnow() + timedelta(seconds=env.settings.heartbeat_timeout_seconds + 1)
    reaped = reaper.reap_rounds(
        env.sessions, env.settings, timeout_seconds=30, max_attempts=3, now=later
    )
    assert reaped.requeued == [round_id]
    assert rounds.run_round(round_id, env.settings, env) == "done"
    assert read_round(env.sessions, round_id).attempt == 2
    _check_learning_round(env, seeded, round_id, labeled)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_cancel_during_training(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=40, n_test=0, epochs=200)
    add_labels(env.sessions, env.storage, seeded, seeded.pool[:12])
    round_id = new_round(env.sessions, seeded.project_id)

    def cancel_after_first_epoch() -> None:
        for _ in range(600):
            row = read_round(env.sessions, round_id)
            if row.progress.get("epoch", 0) >= 1:
                with unit_of_work(env.sessions) as session:
                    stmt = update(Round).where(Round.id == round_id).values(cancel_requested=True)
                    session.execute(stmt)
                return
            threading.Event().wait(0.1)

    canceller = threading.Thread(target=cancel_after_first_epoch)
    canceller.start()
    assert rounds.run_round(round_id, env.settings, env) == "cancelled"
    canceller.join()
    row = read_round(env.sessions, round_id)
    assert row.status == RoundStatus.cancelled.value and row.progress["epoch"] < 200
    assert _versions(env.sessions, round_id) == [] and _queue(env.sessions, round_id) == []


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_unknown_strategy_fails_with_a_clear_message(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=8, n_test=0, strategy="magic")
    round_id = new_round(env.sessions, seeded.project_id)
    assert rounds.run_round(round_id, env.settings, env) == "failed"
    row = read_round(env.sessions, round_id)
    assert row.status == RoundStatus.failed.value
    assert row.error is not None and "'magic'" in row.error and "confident_coreset" in row.error
    assert rounds.run_round(round_id, env.settings, env) == "skipped"


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_one_labeled_class_trains_with_a_warning(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=20, n_test=0)
    add_labels(env.sessions, env.storage, seeded, seeded.pool[:6], class_index=1)
    round_id = new_round(env.sessions, seeded.project_id, budget=4)
    assert rounds.run_round(round_id, env.settings, env) == "done"
    row = read_round(env.sessions, round_id)
    assert row.metrics["test"] is None
    assert "cover only ['melanoma']" in row.metrics["warnings"][0]
    assert len(_queue(env.sessions, round_id)) == 4
