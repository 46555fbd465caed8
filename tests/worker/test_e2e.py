"""End to end: the real API (uvicorn) and a real Celery worker process, two deployments.

(a) embedded: SQLite database + kombu's SQLite transport, the worker started as
``coreloop serve`` starts it (``worker.embedded.start_worker``, beat embedded);
(b) scale-out: PostgreSQL + the machine's Redis (db 14, flushed first).

An admin creates a project, uploads synthetic lesion images (pool + a labeled test split),
starts round 0 (random initial batch), labels the batch through ``GET /queue`` + ``POST
/labels``, starts round 1 and checks its model version, test metrics and next batch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from sqlalchemy import func, select

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.models import ModelVersion, QueueItem
from app.settings import Settings
from tests.worker.conftest import ApiClient, Processes, fresh_settings, lesion_png, make_admin

REDIS_URL = "redis://127.0.0.1:6379/14"
POOL, TEST, CLASSES = 36, 9, 3

DEPLOYMENTS = [
    pytest.param("sqlite", None, id="embedded-sqlite"),
    pytest.param(
        "postgresql",
        REDIS_URL,
        id="postgres-redis",
        marks=[pytest.mark.postgres, pytest.mark.redis],
    ),
]


def deployment_settings(
    db_kind: str, broker_url: str | None, tmp_path: Path, **extra: Any
) -> Settings:
    """Fresh database of ``db_kind``; the broker is Redis at ``broker_url``, else embedded."""
    if broker_url is not None:
        redis.Redis.from_url(broker_url).flushdb()
        extra["broker_url"] = broker_url
    return fresh_settings(db_kind, tmp_path, heartbeat_seconds=1.0, **extra)


def admin_client(settings: Settings, url: str) -> ApiClient:
    engine = make_engine(settings)
    try:
        make_admin(make_sessionmaker(engine), "e2e-admin-token")
    finally:
        engine.dispose()
    return ApiClient(url, "e2e-admin-token")


def upload_project(api: ApiClient, **fields: object) -> tuple[int, dict[int, int]]:
    """A project with POOL unlabeled pool images and TEST labeled test images; returns the
    project id and the true class of every pool image."""
    rng = np.random.default_rng(7)
    project_id = api.create_project(**fields)
    truth: dict[int, int] = {}
    classes = [i % CLASSES for i in range(POOL)]
    ids = api.upload(project_id, [lesion_png(rng, c) for c in classes], "pool")
    truth.update(zip(ids, classes, strict=True))
    names = api.ok("GET", f"/projects/{project_id}")["classes"]
    for c in range(CLASSES):
        api.upload(
            project_id, [lesion_png(rng, c) for _ in range(TEST // CLASSES)], "test", names[c]
        )
    return project_id, truth


def label_batch(api: ApiClient, project_id: int, truth: dict[int, int]) -> list[int]:
    """Lease and label everything the queue offers; returns the labeled image ids."""
    labeled: list[int] = []
    while entries := api.ok("GET", "/queue", params={"project_id": project_id, "limit": 50}):
        for entry in entries:
            api.label(entry["image_id"], truth[entry["image_id"]], entry["lease_id"])
            labeled.append(entry["image_id"])
    return labeled


def count_rows(settings: Settings, model: type, round_id: int) -> int:
    engine = make_engine(settings)
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            stmt = select(func.count()).select_from(model).where(model.round_id == round_id)  # type: ignore[attr-defined]
            return int(session.scalar(stmt) or 0)
    finally:
        engine.dispose()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(("db_kind", "broker_url"), DEPLOYMENTS)
def test_two_rounds_through_the_api_and_a_worker_process(
    db_kind: str, broker_url: str | None, tmp_path: Path, processes: Processes
) -> None:
    settings = deployment_settings(db_kind, broker_url, tmp_path)
    url = processes.start_api(settings)
    processes.start_worker(settings)
    api = admin_client(settings, url)
    project_id, truth = upload_project(api)

    first = api.start_round(project_id)
    round0 = api.wait_round(first)
    assert round0["model_version_id"] is None
    labeled = label_batch(api, project_id, truth)
    assert len(labeled) == 9  # ceil(0.25 * 36)

    second = api.start_round(project_id)
    round1 = api.wait_round(second)
    assert round1["labeled_count"] == len(labeled)
    assert round1["model_version_id"] is not None
    assert round1["test_metrics"]["n"] == TEST
    assert 0.0 <= round1["test_metrics"]["accuracy"] <= 1.0
    assert len(round1["metrics"]["history"]) == 2
    assert count_rows(settings, QueueItem, second) == 6
    assert count_rows(settings, ModelVersion, second) == 1

    if broker_url is None:  # spawned pool children: one that ran a round runs no task after it
        worker_log = next(p for p in processes.logs if p.name.startswith("worker"))
        done = re.findall(
            r"/(SpawnPoolWorker-\d+)\] Task (\S+)\[.*\] succeeded", worker_log.read_text()
        )
        trained: set[str] = set()
        for child, task in done:
            assert child not in trained, f"{child} ran {task} after a round"
            if task == "round.run":
                trained.add(child)
        assert len(trained) >= 2

    batch = api.ok("GET", "/queue", params={"project_id": project_id, "limit": 50})
    assert len(batch) == 6 and {e["round"] for e in batch} == {1}
    assert not {e["image_id"] for e in batch} & set(labeled)
    assert all(e["prediction"] is not None for e in batch)
