"""Model versions: list, read, download (admin), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import ModelVersion, Project
from app.storage import Storage
from tests.api.test_queue import add_round

Headers = dict[str, str]


@pytest.fixture
def add_model(db: Session, storage: Storage) -> Callable[..., ModelVersion]:
    """``add_model(project, round_number, metrics, blob)``: a round and its model version."""

    def factory(
        project: Project,
        number: int,
        metrics: dict[str, Any] | None = None,
        blob: bytes | None = b"weights",
    ) -> ModelVersion:
        found_round = add_round(db, project, number)
        key = f"checkpoints/{project.id}/round-{number}.pt"
        if blob is not None:
            storage.put_bytes(key, blob)
        version = ModelVersion(
            project_id=project.id,
            round_id=found_round.id,
            checkpoint_key=key,
            sha256=hashlib.sha256(blob or b"").hexdigest(),
            metrics=metrics or {},
        )
        db.add(version)
        db.commit()
        return version

    return factory


def test_list_models_newest_round_first_with_metrics(
    client: TestClient,
    make_project: Callable[..., Project],
    add_model: Callable[..., ModelVersion],
    annotator_headers: Headers,
) -> None:
    project = make_project()
    other = make_project()
    first = add_model(project, 0, {"test": {"accuracy": 0.5}, "labeled_count": 12})
    second = add_model(project, 1, {"test": {"accuracy": 0.75}, "history": [{"epoch": 1}]})
    add_model(other, 0)

    response = client.get(f"/projects/{project.id}/models", headers=annotator_headers)

    assert response.status_code == 200
    body = response.json()
    assert [m["id"] for m in body] == [second.id, first.id]
    assert [m["round_number"] for m in body] == [1, 0]
    newest, oldest = body
    assert newest["round_id"] == second.round_id
    assert newest["test_metrics"] == {"accuracy": 0.75}
    assert newest["metrics"]["history"] == [{"epoch": 1}]
    assert newest["download_url"] == f"/models/{second.id}/download"
    assert newest["sha256"] == second.sha256
    assert oldest["labeled_count"] == 12
    assert "checkpoint_key" not in newest  # storage keys stay on the server


def test_list_models_of_a_project_without_models_and_of_an_unknown_one(
    client: TestClient, make_project: Callable[..., Project], annotator_headers: Headers
) -> None:
    project = make_project()
    assert client.get(f"/projects/{project.id}/models", headers=annotator_headers).json() == []
    unknown = client.get("/projects/999999/models", headers=annotator_headers)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "ProjectNotFound")
    assert client.get(f"/projects/{project.id}/models").status_code == 401


def test_read_one_model(
    client: TestClient,
    make_project: Callable[..., Project],
    add_model: Callable[..., ModelVersion],
    annotator_headers: Headers,
) -> None:
    project = make_project()
    version = add_model(project, 3, {"test": "not a dict"})

    response = client.get(f"/models/{version.id}", headers=annotator_headers)

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["project_id"], body["round_number"]) == (version.id, project.id, 3)
    assert body["test_metrics"] is None
    assert body["labeled_count"] is None
    missing = client.get("/models/999999", headers=annotator_headers)
    assert (missing.status_code, missing.json()["error"]) == (404, "ModelNotFound")


def test_download_streams_the_checkpoint_to_admins(
    client: TestClient,
    make_project: Callable[..., Project],
    add_model: Callable[..., ModelVersion],
    admin_headers: Headers,
) -> None:
    project = make_project()
    blob = bytes(range(256)) * 1000  # several chunks
    version = add_model(project, 2, blob=blob)

    response = client.get(f"/models/{version.id}/download", headers=admin_headers)

    assert response.status_code == 200
    assert response.content == blob
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(blob))
    assert response.headers["etag"] == f'"{hashlib.sha256(blob).hexdigest()}"'
    disposition = response.headers["content-disposition"]
    assert disposition == (
        f'attachment; filename="coreloop-p{project.id}-round2-model{version.id}.pt"'
    )


def test_download_is_for_admins_only(
    client: TestClient,
    make_project: Callable[..., Project],
    add_model: Callable[..., ModelVersion],
    annotator_headers: Headers,
) -> None:
    version = add_model(make_project(), 0)
    forbidden = client.get(f"/models/{version.id}/download", headers=annotator_headers)
    assert (forbidden.status_code, forbidden.json()["error"]) == (403, "Forbidden")
    assert client.get(f"/models/{version.id}/download").status_code == 401


def test_download_of_a_missing_checkpoint_or_model(
    client: TestClient,
    make_project: Callable[..., Project],
    add_model: Callable[..., ModelVersion],
    admin_headers: Headers,
) -> None:
    version = add_model(make_project(), 0, blob=None)
    missing_file = client.get(f"/models/{version.id}/download", headers=admin_headers)
    assert (missing_file.status_code, missing_file.json()["error"]) == (404, "CheckpointMissing")
    unknown = client.get("/models/999999/download", headers=admin_headers)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "ModelNotFound")
