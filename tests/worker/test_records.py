"""The worker's database side on SQLite and PostgreSQL, with real commits."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import Event, ModelVersion, Prediction, QueueItem, Round, RoundStatus, utcnow
from app.settings import Settings
from app.storage import Storage
from app.webhooks.models import WebhookDelivery, WebhookSubscription
from tests.worker.conftest import add_labels, new_round, read_round, seed_project
from worker import reaper, records
from worker.celery_app import make_celery
from worker.embedded import settings_env
from worker.records import LostClaim, PredictionEntry, QueueEntry, RoundResult
from worker.tasks import delete_consumed_messages


def _count(sessions: sessionmaker[Session], model: type, **where: int) -> int:
    with unit_of_work(sessions) as session:
        stmt = select(func.count()).select_from(model)
        for column, value in where.items():
            stmt = stmt.where(getattr(model, column) == value)
        return int(session.scalar(stmt) or 0)


def _result(image_ids: list[int], version_id: int | None) -> RoundResult:
    queue = [QueueEntry(i, 1.0, 0.5, 0.7) for i in image_ids[:3]]
    preds = [PredictionEntry(i, [0.2, 0.8], None, 0.5) for i in image_ids]
    return RoundResult(queue, preds, {"test": {"accuracy": 0.5}}, version_id)


def _age_heartbeat(sessions: sessionmaker[Session], round_id: int, seconds: float) -> None:
    with unit_of_work(sessions) as session:
        session.execute(
            update(Round)
            .where(Round.id == round_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def test_claim_twice_second_finds_nothing(
    sessions: sessionmaker[Session], file_storage: Storage
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=6, n_test=2)
    label_ids = add_labels(sessions, file_storage, seeded, seeded.pool[:2])
    round_id = new_round(sessions, seeded.project_id)

    claim = records.claim_round(sessions, round_id)
    assert claim is not None
    assert records.claim_round(sessions, round_id) is None

    row = read_round(sessions, round_id)
    assert (row.status, row.attempt) == (RoundStatus.training.value, 1)
    assert row.label_snapshot_id == claim.label_snapshot_id == max(label_ids)
    assert row.started_at is not None and row.heartbeat_at is not None


def test_snapshot_is_kept_by_later_attempts(
    sessions: sessionmaker[Session], file_storage: Storage
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=6, n_test=2)
    round_id = new_round(sessions, seeded.project_id)
    first = records.claim_round(sessions, round_id)
    assert first is not None
    assert records.release_round(sessions, first)
    add_labels(sessions, file_storage, seeded, seeded.pool[:3])  # newer labels arrive
    second = records.claim_round(sessions, round_id)
    assert second is not None
    assert second.attempt == 2
    assert second.label_snapshot_id == first.label_snapshot_id


def test_writes_of_an_old_attempt_are_fenced(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=6, n_test=0, label_test=False)
    round_id = new_round(sessions, seeded.project_id)
    old = records.claim_round(sessions, round_id)
    assert old is not None
    _age_heartbeat(sessions, round_id, 600)
    reaped = reaper.reap_rounds(sessions, worker_settings, timeout_seconds=60, max_attempts=3)
    assert reaped.requeued == [round_id]
    new = records.claim_round(sessions, round_id)
    assert new is not None and new.attempt == 2

    with pytest.raises(LostClaim):
        records.set_progress(sessions, old, {"phase": "training"})
    with pytest.raises(LostClaim):
        records.finalize_round(sessions, worker_settings, old, _result(seeded.pool, None))
    assert not records.end_round(sessions, worker_settings, old, RoundStatus.failed, "late")
    assert records.beat(sessions, old).owned is False
    assert records.beat(sessions, new).owned is True
    assert read_round(sessions, round_id).status == RoundStatus.training.value


def test_reaper_requeues_stale_heartbeat_then_fails_after_max_attempts(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=4, n_test=0, label_test=False)
    round_id = new_round(sessions, seeded.project_id)
    for attempt in (1, 2):
        claim = records.claim_round(sessions, round_id)
        assert claim is not None and claim.attempt == attempt
        fresh = reaper.reap_rounds(sessions, worker_settings, timeout_seconds=60, max_attempts=3)
        assert fresh.requeued == [] and fresh.to_send == []
        _age_heartbeat(sessions, round_id, 120)
        reaped = reaper.reap_rounds(sessions, worker_settings, timeout_seconds=60, max_attempts=3)
        assert reaped.requeued == [round_id] and reaped.to_send == [round_id]
        row = read_round(sessions, round_id)
        assert row.status == RoundStatus.queued.value

    claim = records.claim_round(sessions, round_id)
    assert claim is not None and claim.attempt == 3
    _age_heartbeat(sessions, round_id, 120)
    reaped = reaper.reap_rounds(sessions, worker_settings, timeout_seconds=60, max_attempts=3)
    assert reaped.failed == [round_id] and reaped.to_send == []
    row = read_round(sessions, round_id)
    assert row.status == RoundStatus.failed.value
    assert row.error is not None and "attempt 3 of 3" in row.error
    assert _count(sessions, Event, project_id=seeded.project_id) == 1  # round.failed


def test_reaper_resends_queued_rounds(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=4, n_test=0, label_test=False)
    round_id = new_round(sessions, seeded.project_id)
    assert (
        reaper.reap_rounds(sessions, worker_settings, timeout_seconds=60, max_attempts=3).resent
        == []
    )
    startup = reaper.reap_rounds(
        sessions, worker_settings, timeout_seconds=60, max_attempts=3, resend_all_queued=True
    )
    assert startup.resent == [round_id]
    later = utcnow() + timedelta(seconds=61)
    assert reaper.reap_rounds(
        sessions, worker_settings, timeout_seconds=60, max_attempts=3, now=later
    ).resent == [round_id]


def test_finalize_twice_gives_one_model_version_and_one_batch(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=8, n_test=0, label_test=False)
    round_id = new_round(sessions, seeded.project_id)
    claim = records.claim_round(sessions, round_id)
    assert claim is not None
    first = records.save_model_version(sessions, claim, "models/1/round-0.pt", "a" * 64, {})
    again = records.save_model_version(sessions, claim, "models/1/round-0.pt", "b" * 64, {"x": 1})
    assert first == again

    result = _result(seeded.pool, first)
    assert (
        records.finalize_round(sessions, worker_settings, claim, result) == RoundStatus.done.value
    )
    with pytest.raises(LostClaim):
        records.finalize_round(sessions, worker_settings, claim, result)

    assert _count(sessions, ModelVersion, round_id=round_id) == 1
    assert _count(sessions, QueueItem, round_id=round_id) == 3
    assert _count(sessions, Prediction, model_version_id=first) == len(seeded.pool)
    with unit_of_work(sessions) as session:
        version = session.get(ModelVersion, first)
        assert version is not None and version.sha256 == "b" * 64
        assert version.metrics["test"] == {"accuracy": 0.5}
        items = session.scalars(
            select(QueueItem).where(QueueItem.round_id == round_id).order_by(QueueItem.rank)
        ).all()
        assert [i.image_id for i in items] == seeded.pool[:3]
        assert {i.labels_needed for i in items} == {1}
        kinds = session.scalars(select(Event.kind).where(Event.project_id == seeded.project_id))
        assert list(kinds) == ["round.done", "model.published"]
    row = read_round(sessions, round_id)
    assert row.status == RoundStatus.done.value and row.finished_at is not None


def test_finalize_honours_a_cancel_request(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=4, n_test=0, label_test=False)
    round_id = new_round(sessions, seeded.project_id)
    claim = records.claim_round(sessions, round_id)
    assert claim is not None
    with unit_of_work(sessions) as session:
        session.execute(update(Round).where(Round.id == round_id).values(cancel_requested=True))
    assert records.beat(sessions, claim).cancel_requested
    outcome = records.finalize_round(sessions, worker_settings, claim, _result(seeded.pool, None))
    assert outcome == RoundStatus.cancelled.value
    assert _count(sessions, QueueItem, round_id=round_id) == 0
    assert read_round(sessions, round_id).status == RoundStatus.cancelled.value


def test_json_safe_replaces_non_finite_floats() -> None:
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}
    assert records.json_safe(value) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_round_done_and_model_published_reach_webhooks(
    sessions: sessionmaker[Session], file_storage: Storage, worker_settings: Settings
) -> None:
    seeded = seed_project(sessions, file_storage, n_pool=6, n_test=0, label_test=False)
    with unit_of_work(sessions) as session:
        session.add(
            WebhookSubscription(
                project_id=seeded.project_id,
                url="http://127.0.0.1:9/hook",
                events=["round.done", "model.published"],
                secret="s" * 32,
                active=True,
            )
        )
    round_id = new_round(sessions, seeded.project_id)
    claim = records.claim_round(sessions, round_id)
    assert claim is not None
    version = records.save_model_version(sessions, claim, "models/1/round-0.pt", "c" * 64, {})
    records.finalize_round(sessions, worker_settings, claim, _result(seeded.pool, version))
    with unit_of_work(sessions) as session:
        kinds = session.scalars(select(WebhookDelivery.event_kind).order_by(WebhookDelivery.id))
        assert list(kinds) == ["round.done", "model.published"]


# --- the Celery side: configuration from the settings, and the broker's cleanup -----------


def test_celery_configuration_follows_the_settings(tmp_path: Path) -> None:
    embedded = make_celery(Settings(data_dir=tmp_path, heartbeat_timeout_seconds=8))
    conf = embedded.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_ignore_result
    assert conf.worker_prefetch_multiplier == 1 and conf.accept_content == ["json"]
    assert conf.task_routes["round.run"] == {"queue": "training"}
    assert conf.beat_schedule["reap-rounds"]["schedule"] == 2.0  # a quarter of the timeout
    assert "clean-broker" in conf.beat_schedule
    assert conf.worker_pool_start_method == "spawn"  # never fork a process that holds SQLite
    scaled = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/14"))
    assert scaled.conf.beat_schedule["reap-rounds"]["schedule"] == 30.0
    assert "clean-broker" not in scaled.conf.beat_schedule
    assert scaled.conf.worker_pool_start_method == "fork"


def test_settings_travel_to_the_worker_as_environment(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, heartbeat_seconds=3.5, embedded_worker=False)
    env = settings_env(settings)
    assert env["CORELOOP_HEARTBEAT_SECONDS"] == "3.5"
    again = Settings.model_validate(
        {k.removeprefix("CORELOOP_").lower(): v for k, v in env.items()}
    )
    assert again == settings


def test_broker_cleanup_deletes_consumed_messages_older_than_an_hour(tmp_path: Path) -> None:
    url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    with Connection(url) as conn:
        queue = conn.SimpleQueue("default")
        queue.put({"n": 1})
        queue.put({"n": 2})
        queue.get(timeout=5).ack()
        queue.close()
    database = url.removeprefix("sqla+")
    assert delete_consumed_messages(database, datetime.now()) == 0
    assert delete_consumed_messages(database, datetime.now() + timedelta(hours=2)) == 1
    with Connection(url) as conn:
        queue = conn.SimpleQueue("default")
        assert queue.get(timeout=5).payload == {"n": 2}  # the pending one is kept
        queue.close()
