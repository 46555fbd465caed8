"""The project's selection options in a real round runner (issue 12): groups (``group_key``,
``exclude_labeled_groups``) in round 0 and in a learning round, the cold start (TypiClust /
ProbCover) of round 0, and the stopping signal of round 2 against round 1's predictions."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Image, QueueItem, WarmStart
from app.settings import Settings
from app.storage import Storage
from ml.models import build_model
from tests.worker.conftest import Seeded, add_labels, new_round, read_round, seed_project
from worker import rounds
from worker.inputs import RoundEnv

pytestmark = pytest.mark.parametrize("db_kind", ["sqlite"])


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


def _lesions(env: RoundEnv, seeded: Seeded, per_lesion: int = 3) -> dict[int, str]:
    """Give the pool images a ``lesion_id`` (``per_lesion`` images each, one without)."""
    lesion = {image_id: f"L{k // per_lesion}" for k, image_id in enumerate(seeded.pool)}
    with unit_of_work(env.sessions) as session:
        for image_id, name in lesion.items():
            meta = {} if image_id == seeded.pool[-1] else {"lesion_id": name}
            session.execute(update(Image).where(Image.id == image_id).values(meta=meta))
    lesion.pop(seeded.pool[-1])
    return lesion


def _run(env: RoundEnv, seeded: Seeded, budget: int = 5) -> tuple[int, list[int]]:
    round_id = new_round(env.sessions, seeded.project_id, budget=budget)
    assert rounds.run_round(round_id, env.settings, env) == "done", read_round(
        env.sessions, round_id
    ).error
    with unit_of_work(env.sessions) as session:
        stmt = select(QueueItem.image_id).where(QueueItem.round_id == round_id)
        picked = list(session.scalars(stmt.order_by(QueueItem.rank)))
        session.execute(
            update(QueueItem).where(QueueItem.round_id == round_id).values(labels_needed=0)
        )
    add_labels(env.sessions, env.storage, seeded, picked)
    return round_id, picked


def test_groups_in_every_round_and_the_stopping_signal(env: RoundEnv) -> None:
    seeded = seed_project(
        env.sessions,
        env.storage,
        n_pool=45,
        n_test=6,
        group_key="lesion_id",
        exclude_labeled_groups=True,
    )
    lesion = _lesions(env, seeded, per_lesion=2)  # 22 lesions of 2 images + 1 without
    labeled: list[int] = []
    for number in range(3):
        round_id, picked = _run(env, seeded)
        groups = [lesion[i] for i in picked if i in lesion]
        assert len(groups) == len(set(groups)), f"round {number}: two picks share a lesion"
        assert not set(groups) & {lesion[i] for i in labeled if i in lesion}
        assert len(picked) == (12 if number == 0 else 5)  # ceil(0.25 * 45), then B: 22 of 23
        labeled += picked
        metrics = read_round(env.sessions, round_id).metrics
        if number == 1:
            assert metrics["stopping"] is None  # round 0 predicted nothing
        if number == 2:
            stop = metrics["stopping"]
            assert stop["previous_round"] == 1
            assert stop["n"] == len(seeded.pool) - len(labeled) + len(picked)
            assert -1.0 <= stop["kappa"] <= 1.0 and 0.0 <= stop["agreement"] <= 1.0


@pytest.mark.parametrize("method", ["typiclust", "probcover"])
def test_cold_start_round_zero(env: RoundEnv, method: str) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=30, n_test=4, cold_start=method)
    round_id, picked = _run(env, seeded)
    row = read_round(env.sessions, round_id)
    assert row.metrics["cold_start"] == method and "untrained" in row.metrics["note"]
    assert len(picked) == len(set(picked)) == 8 and set(picked) <= set(seeded.pool)
    # with a warm-start backbone stored for the project, the embedding is its
    seeded = seed_project(env.sessions, env.storage, n_pool=30, n_test=4, cold_start=method)
    buf = io.BytesIO()
    torch.save(build_model("classification", 2).resnet.state_dict(), buf)
    key = f"models/{seeded.project_id}/warm-start.pt"
    env.storage.put_bytes(key, buf.getvalue())
    with unit_of_work(env.sessions) as session:  # as worker.pretrain records a finished one
        session.add(WarmStart(project_id=seeded.project_id, status="done", checkpoint_key=key))
    round_id, _ = _run(env, seeded)
    assert "warm-start embedding" in read_round(env.sessions, round_id).metrics["note"]


def test_stopping_signal_of_a_segmentation_project(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, task="segmentation", n_pool=30, n_test=4)
    labeled: list[int] = []
    for _ in range(3):
        round_id, picked = _run(env, seeded)
        labeled += picked
    stop = read_round(env.sessions, round_id).metrics["stopping"]
    assert stop["previous_round"] == 1 and stop["n"] == len(seeded.pool) - len(labeled) + 5
    assert 0.0 <= stop["dice"] <= 1.0 and 0.0 <= stop["agreement"] <= 1.0
    assert -1.0 <= stop["kappa"] <= 1.0
