"""Model versions: list a project's trained models, read one, download its checkpoint (admin).

Read-only views over ``model_version`` rows joined to their rounds; the rules that create
them live in the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.deps import AdminUser, CurrentUser, SessionDep, StorageDep
from app.errors import NotFound
from app.models import ModelVersion, Round
from app.schemas.models import ModelVersionOut
from app.services.members import require_member
from app.services.projects import get_project
from app.storage import Storage

router = APIRouter(tags=["models"])


def _version_out(version: ModelVersion, found_round: Round) -> ModelVersionOut:
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


def _get_version(session: Session, model_id: int) -> tuple[ModelVersion, Round]:
    row = session.execute(
        select(ModelVersion, Round)
        .join(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.id == model_id)
    ).first()
    if row is None:
        raise NotFound(f"Model version {model_id} does not exist.", code="ModelNotFound")
    return row[0], row[1]


@router.get("/projects/{project_id}/models")
def list_models(project_id: int, session: SessionDep, user: CurrentUser) -> list[ModelVersionOut]:
    """The project's model versions, newest round first."""
    get_project(session, project_id)
    require_member(session, user, project_id)
    rows = session.execute(
        select(ModelVersion, Round)
        .join(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.project_id == project_id)
        .order_by(Round.number.desc(), ModelVersion.id.desc())
    ).all()
    return [_version_out(version, found_round) for version, found_round in rows]


@router.get("/models/{model_id}")
def read_model(model_id: int, session: SessionDep, user: CurrentUser) -> ModelVersionOut:
    version, found_round = _get_version(session, model_id)
    require_member(session, user, version.project_id)
    return _version_out(version, found_round)


def _checkpoint_size(storage: Storage, version: ModelVersion) -> int:
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


@router.get(
    "/models/{model_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "Checkpoint"}},
)
def download_model(
    model_id: int, session: SessionDep, storage: StorageDep, _: AdminUser
) -> StreamingResponse:
    """The checkpoint file, streamed; ``ETag`` is its SHA-256."""
    version, found_round = _get_version(session, model_id)
    size = _checkpoint_size(storage, version)
    suffix = PurePosixPath(version.checkpoint_key).suffix or ".bin"
    filename = f"coreloop-p{version.project_id}-round{found_round.number}-model{version.id}{suffix}"
    chunks: Iterator[bytes] = storage.iter_chunks(version.checkpoint_key)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "ETag": f'"{version.sha256}"',
            "Cache-Control": "private, no-cache",
        },
    )
