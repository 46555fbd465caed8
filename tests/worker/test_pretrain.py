"""The warm-start job in-process (called directly, not through Celery) on tiny synthetic
projects: it runs once on pool images only, resumes after a crash from its last epoch, cancels
between batches and restarts from its last epoch, is reaped like a round, and later rounds
train from it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Event, QueueItem, RoundStatus, WarmStart
from app.settings import Settings
from app.storage import Storage
from ml.checkpoint import file_sha256, load_checkpoint
from ml.models import build_model
from ml.pretrain import PretrainConfig, PretrainResult, pretrain_backbone
from tests.worker.conftest import Seeded, add_labels, new_round, seed_project
from worker import learning, pretrain, pretrain_records, rounds
from worker.inputs import RoundEnv

pytestmark = pytest.mark.parametrize("db_kind", ["sqlite"])

EPOCHS = 3


class Crash(BaseException):
    """Stands for the worker process dying (nothing catches it)."""


@pytest.fixture(autouse=True)
def _tiny(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Three epochs, a resumable state after every one; one thread (tiny models)."""
    monkeypatch.setattr(pretrain, "default_epochs", lambda *a, **k: EPOCHS)
    monkeypatch.setattr(pretrain, "RESUME_EVERY_SECONDS", 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def env(
    worker_settings: Settings, sessions: sessionmaker[Session], file_storage: Storage
) -> RoundEnv:
    return RoundEnv(worker_settings, sessions, file_storage)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every pretrain_backbone call of the job: its images, config and resume epoch."""
    seen: list[dict[str, Any]] = []

    def spy(images: np.ndarray, config: PretrainConfig, **kwargs: Any) -> PretrainResult:
        resume = kwargs.get("resume")
        seen.append(
            {
                "images": images.copy(),
                "config": config,
                "resume_epoch": None if resume is None else resume["epoch"],
                "kwargs": kwargs,
            }
        )
        return pretrain_backbone(images, config, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_backbone", spy)
    return seen


def _project(env: RoundEnv, **fields: Any) -> Seeded:
    return seed_project(env.sessions, env.storage, n_pool=20, n_test=6, **fields)


def _new_warm_start(sessions: sessionmaker[Session], project_id: int) -> int:
    """Insert the project's warm start, queued (as ``POST .../warm-start``, without sending)."""
    with unit_of_work(sessions) as session:
        row = WarmStart(
            project_id=project_id,
            status=RoundStatus.queued.value,
            progress={},
            metrics={},
            attempt=0,
            cancel_requested=False,
        )
        session.add(row)
        session.flush()
        return row.id


def _row(sessions: sessionmaker[Session], warm_start_id: int) -> WarmStart:
    with unit_of_work(sessions) as session:
        row = session.get(WarmStart, warm_start_id)
        assert row is not None
        return row


def _set(sessions: sessionmaker[Session], warm_start_id: int, **values: Any) -> None:
    with unit_of_work(sessions) as session:
        session.execute(update(WarmStart).where(WarmStart.id == warm_start_id).values(**values))


def _restart(sessions: sessionmaker[Session], warm_start_id: int) -> None:
    """What ``POST .../warm-start`` does to a failed or cancelled warm start."""
    _set(
        sessions,
        warm_start_id,
        status=RoundStatus.queued.value,
        cancel_requested=False,
        error=None,
        progress={},
        finished_at=None,
    )


def _straight(images: np.ndarray, config: PretrainConfig) -> PretrainResult:
    return pretrain_backbone(images, config)


def _check_done(env: RoundEnv, seeded: Seeded, warm_start_id: int) -> WarmStart:
    row = _row(env.sessions, warm_start_id)
    assert row.status == RoundStatus.done.value, row.error
    assert row.progress["phase"] == "done" and row.progress["epoch"] == EPOCHS
    assert row.progress["epochs"] == EPOCHS and row.progress["pool_size"] == len(seeded.pool)
    assert [h["epoch"] for h in row.metrics["history"]] == [1.0, 2.0, 3.0]
    assert row.metrics["method"] == "simclr" and row.metrics["pool_size"] == len(seeded.pool)
    assert row.checkpoint_key == f"models/{seeded.project_id}/warm-start.pt"
    path = env.storage.path(pretrain_records.checkpoint_key(seeded.project_id))
    assert file_sha256(path) == row.sha256
    assert not env.storage.exists(pretrain_records.resume_key(seeded.project_id))
    return row


def test_runs_once_on_pool_images_only(env: RoundEnv, calls: list[dict[str, Any]]) -> None:
    seeded = _project(env)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "done"
    _check_done(env, seeded, warm_id)
    (call,) = calls
    assert call["images"].shape == (len(seeded.pool), 32, 32, 3)  # 20 pool, no test image
    assert call["config"].seed == seeded.project_id and call["config"].image_size == 32
    path = env.storage.path(pretrain_records.checkpoint_key(seeded.project_id))
    state = load_checkpoint(path)
    for model in (build_model("classification", 3, path), build_model("segmentation", 1, path)):
        assert torch.equal(model.resnet.state_dict()["conv1.weight"], state["conv1.weight"])
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "skipped"  # once
    assert len(calls) == 1
    with unit_of_work(env.sessions) as session:
        kinds = list(session.scalars(select(Event.kind).order_by(Event.id)))
    assert kinds == ["warm_start.done"]


def test_resumes_after_a_crash_from_its_last_epoch(
    env: RoundEnv, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = _project(env)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    real_save = pretrain.save_checkpoint

    def crash_after_epoch_two(path: Any, state: dict[str, Any]) -> str:
        digest = real_save(path, state)
        if state.get("epoch") == 2:
            raise Crash("the worker died")
        return digest

    monkeypatch.setattr(pretrain, "save_checkpoint", crash_after_epoch_two)
    with pytest.raises(Crash):
        pretrain.run_warm_start(warm_id, env.settings, env)
    monkeypatch.setattr(pretrain, "save_checkpoint", real_save)
    row = _row(env.sessions, warm_id)
    assert (row.status, row.attempt, row.progress["epoch"]) == ("training", 1, 1)  # then died

    # The reaper sees the stopped heartbeat, re-queues it and asks for a new message.
    reaped = pretrain_records.reap_warm_starts(
        env.sessions, env.settings, timeout_seconds=0.0, max_attempts=3
    )
    assert reaped.to_send == [warm_id]
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "done"
    row = _check_done(env, seeded, warm_id)
    assert row.attempt == 2
    assert [c["resume_epoch"] for c in calls] == [None, 2]
    straight = _straight(calls[0]["images"], calls[0]["config"])
    saved = load_checkpoint(env.storage.path(pretrain_records.checkpoint_key(seeded.project_id)))
    for key, value in straight.state_dict.items():
        assert torch.equal(saved[key], value), key
    losses = [h["loss"] for h in row.metrics["history"]]
    assert losses == [h["loss"] for h in straight.history]


def test_cancel_between_batches_then_restart_resumes(
    env: RoundEnv, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = _project(env)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    real = pretrain.pretrain_backbone

    def cancel_after_epoch_one(images: np.ndarray, config: Any, **kwargs: Any) -> Any:
        should_stop: Callable[[], bool] = kwargs["should_stop"]
        on_epoch = kwargs["on_epoch"]

        def on_epoch_then_cancel(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
            on_epoch(epoch, epochs, metrics)
            if epoch == 1:  # what POST .../warm-start/cancel does; wait for the heartbeat
                _set(env.sessions, warm_id, cancel_requested=True)
                deadline = time.monotonic() + 20
                while not should_stop() and time.monotonic() < deadline:
                    time.sleep(0.05)

        return real(images, config, **{**kwargs, "on_epoch": on_epoch_then_cancel})

    monkeypatch.setattr(pretrain, "pretrain_backbone", cancel_after_epoch_one)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "cancelled"
    row = _row(env.sessions, warm_id)
    assert (row.status, row.progress["phase"], row.checkpoint_key) == (
        "cancelled",
        "cancelled",
        None,
    )
    assert pretrain.warm_start_weights(env, seeded.project_id) is None
    resume = load_checkpoint(env.storage.path(pretrain_records.resume_key(seeded.project_id)))
    assert resume["epoch"] == 1  # kept for a restart

    monkeypatch.setattr(pretrain, "pretrain_backbone", real)
    _restart(env.sessions, warm_id)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "done"
    row = _check_done(env, seeded, warm_id)
    assert row.attempt == 2
    assert [c["resume_epoch"] for c in calls] == [None, 1]


def test_cancel_of_a_queued_warm_start_is_never_claimed(
    env: RoundEnv, calls: list[dict[str, Any]]
) -> None:
    seeded = _project(env)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    _set(env.sessions, warm_id, status=RoundStatus.cancelled.value)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "skipped"
    assert calls == []


def test_too_small_a_pool_fails_with_a_clear_error(env: RoundEnv) -> None:
    seeded = seed_project(env.sessions, env.storage, n_pool=1, n_test=2)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "failed"
    row = _row(env.sessions, warm_id)
    assert row.status == "failed" and "at least 2 pool images" in (row.error or "")


def test_reaper_fails_after_max_attempts_and_resends_queued(env: RoundEnv) -> None:
    seeded = _project(env)
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    reaped = pretrain_records.reap_warm_starts(
        env.sessions, env.settings, timeout_seconds=30.0, max_attempts=3, resend_all_queued=True
    )
    assert reaped.resent == [warm_id] and not reaped.requeued
    _set(env.sessions, warm_id, status=RoundStatus.training.value, attempt=3, heartbeat_at=None)
    reaped = pretrain_records.reap_warm_starts(
        env.sessions, env.settings, timeout_seconds=30.0, max_attempts=3
    )
    assert reaped.failed == [warm_id]
    row = _row(env.sessions, warm_id)
    assert row.status == "failed" and "stopped responding" in (row.error or "")


def test_later_rounds_train_from_the_warm_start(
    env: RoundEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeded = _project(env, epochs=1)
    assert pretrain.warm_start_weights(env, seeded.project_id) is None
    warm_id = _new_warm_start(env.sessions, seeded.project_id)
    assert pretrain.run_warm_start(warm_id, env.settings, env) == "done"
    path = pretrain.warm_start_weights(env, seeded.project_id)
    assert path == str(env.storage.path(f"models/{seeded.project_id}/warm-start.pt"))

    weights: list[str | None] = []
    real = learning.train_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        weights.append(args[3].weights_path)
        return real(*args, **kwargs)

    monkeypatch.setattr(learning, "train_model", spy)
    round_zero = new_round(env.sessions, seeded.project_id, budget=5)
    assert rounds.run_round(round_zero, env.settings, env) == "done"
    with unit_of_work(env.sessions) as session:
        batch = list(
            session.scalars(select(QueueItem.image_id).where(QueueItem.round_id == round_zero))
        )
    add_labels(env.sessions, env.storage, seeded, batch)
    for _ in range(2):
        round_id = new_round(env.sessions, seeded.project_id, budget=3)
        assert rounds.run_round(round_id, env.settings, env) == "done"
    assert weights == [path, path]


def test_config_survives_a_change_of_device(env: RoundEnv) -> None:
    config = replace(PretrainConfig(), epochs=7, crop_scale=(0.5, 1.0))
    state = {"config": {**config.__dict__, "crop_scale": [0.5, 1.0], "crop_ratio": [0.75, 1.0]}}
    again = pretrain._config_from(state, "cpu")
    assert again.epochs == 7 and again.crop_scale == (0.5, 1.0) and again.device == "cpu"
