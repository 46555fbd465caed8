"""Model versions: list a project's trained models, read one, download its checkpoint (admin).

Read-only views over ``model_version`` rows joined to their rounds; the rules that create
them live in the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.deps import AdminUser, CurrentUser, SessionDep, StorageDep
from app.members.service import require_member
from app.model_versions import service
from app.model_versions.schemas import ModelVersionOut
from app.projects.service import get_project

router = APIRouter(tags=["models"])


@router.get("/projects/{project_id}/models")
def list_models(project_id: int, session: SessionDep, user: CurrentUser) -> list[ModelVersionOut]:
    """The project's model versions, newest round first."""
    get_project(session, project_id)
    require_member(session, user, project_id)
    return service.project_versions(session, project_id)


@router.get("/models/{model_id}")
def read_model(model_id: int, session: SessionDep, user: CurrentUser) -> ModelVersionOut:
    version, found_round = service.get_version(session, model_id)
    require_member(session, user, version.project_id)
    return service.version_out(version, found_round)


@router.get(
    "/models/{model_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "Checkpoint"}},
)
def download_model(
    model_id: int, session: SessionDep, storage: StorageDep, _: AdminUser
) -> StreamingResponse:
    """The checkpoint file, streamed; ``ETag`` is its SHA-256."""
    version, found_round = service.get_version(session, model_id)
    size = service.checkpoint_size(storage, version)
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
