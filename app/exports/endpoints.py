"""Export (streamed) and import of labels: Label Studio JSON, COCO, CSV, PNG-mask zip."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from app.deps import AdminUser, SessionDep, SettingsDep, StorageDep
from app.exports import service as formats
from app.exports.schemas import ExportFormat, ImportFormat, ImportResult
from app.images.service import clean_filename, read_limited

router = APIRouter(tags=["export"])

_EXPORT_CONTENT: dict[str, dict[str, object]] = {
    "application/json": {},
    "text/csv": {},
    "application/zip": {},
}


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": _EXPORT_CONTENT, "description": "The export, streamed"}},
)
def export_labels(
    request: Request,
    project_id: int,
    session: SessionDep,
    storage: StorageDep,
    _: AdminUser,
    format: Annotated[ExportFormat, Query()] = "ls",
    history: bool = False,
) -> StreamingResponse:
    """The project's labels as ``ls`` (Label Studio tasks with predictions), ``coco``, ``csv``
    (classification) or ``masks`` (a zip of PNG masks; segmentation).

    ``history=false``: each image's current label; ``true``: every label, oldest first.
    Rows are read a page at a time while the response is sent.
    """
    snap = formats.snapshot_project(session, project_id)
    stream = formats.export_stream(
        format,
        request.app.state.sessions,
        storage,
        snap,
        history=history,
        base_url=str(request.base_url),
    )
    media_type, ext = formats.MEDIA_TYPES[format]
    name = f"coreloop-project{snap.id}-{format}{'-history' if history else ''}.{ext}"
    return StreamingResponse(
        stream,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@router.post("/projects/{project_id}/import")
def import_labels(
    project_id: int,
    file: Annotated[UploadFile, File()],
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    admin: AdminUser,
    format: Annotated[ImportFormat, Query()],
) -> ImportResult:
    """Labels from a file of ``format`` for images already in the project (matched by
    sha256, coreloop image id, or a unique file name); stored with source ``import``.

    All or nothing; re-importing the same file stores nothing new (content-derived keys).
    """
    name = clean_filename(file.filename)
    data = read_limited(file.file, settings.max_upload_bytes, name)
    return formats.import_file(session, settings, storage, admin, project_id, format, data)
