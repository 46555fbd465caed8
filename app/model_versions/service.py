"""Model versions: the queries and rules behind ``/projects/{id}/models`` and ``/models/{id}``.

Read-only views over ``model_version`` rows joined to their rounds; the rules that create
them live in the worker.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.model_versions.schemas import ModelVersionOut
from app.models import ModelVersion, Round
from app.storage import Storage


def version_out(version: ModelVersion, found_round: Round) -> ModelVersionOut:
    metrics = version.metrics if isinstance(version.metrics, dict) else {}
    test = metrics.get("test")
    labeled = metrics.get("labeled_count", found_round.labeled_count)
    return ModelVersionOut(
        id=version.id,
        project_id=version.project_id,
        round_id=version.round_id,
        round_number=found_round.number,
        sha256=version.sha256,
        metrics=metrics,
        test_metrics=test if isinstance(test, dict) else None,
        labeled_count=labeled if isinstance(labeled, int) else None,
        download_url=f"/models/{version.id}/download",
        created_at=version.created_at,
    )


def get_version(session: Session, model_id: int) -> tuple[ModelVersion, Round]:
    row = session.execute(
        select(ModelVersion, Round)
        .join(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.id == model_id)
    ).first()
    if row is None:
        raise NotFound(f"Model version {model_id} does not exist.", code="ModelNotFound")
    return row[0], row[1]


def project_versions(session: Session, project_id: int) -> list[ModelVersionOut]:
    """The project's model versions, newest round first."""
    rows = session.execute(
        select(ModelVersion, Round)
        .join(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.project_id == project_id)
        .order_by(Round.number.desc(), ModelVersion.id.desc())
    ).all()
    return [version_out(version, found_round) for version, found_round in rows]


def checkpoint_size(storage: Storage, version: ModelVersion) -> int:
    missing = NotFound(
        f"The checkpoint of model version {version.id} is missing from storage.",
        code="CheckpointMissing",
    )
    try:
        path = storage.path(version.checkpoint_key)
    except ValueError as exc:
        raise missing from exc
    if not path.is_file():
        raise missing
    return path.stat().st_size
