"""Images: admins upload (one or many files per request); the project's members read them."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import FileResponse

from app.deps import AdminUser, CurrentUser, SessionDep, SettingsDep, StorageDep
from app.errors import InvalidInput, NotFound
from app.images import service
from app.images.schemas import (
    CurrentLabel,
    ImageDetail,
    ImageOut,
    ImagePage,
    SplitName,
    UploadedFile,
    UploadResult,
)
from app.members.service import reads_filter, require_member
from app.models import Label
from app.projects.service import get_project

router = APIRouter(tags=["images"])


def _parse_meta(meta: str | None) -> dict[str, Any]:
    if not meta:
        return {}
    try:
        value = json.loads(meta)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"meta is not valid JSON: {exc}.", code="InvalidMeta") from exc
    if not isinstance(value, dict):
        raise InvalidInput("meta must be a JSON object.", code="InvalidMeta")
    return value


@router.post(
    "/projects/{project_id}/images",
    response_model=UploadResult,
    status_code=status.HTTP_201_CREATED,
)
def upload_images(
    project_id: int,
    files: Annotated[list[UploadFile], File(description="One or many image files.")],
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    admin: AdminUser,
    response: Response,
    split: Annotated[SplitName, Form()] = "pool",
    label: Annotated[str | None, Form(description="A class name for every file.")] = None,
    meta: Annotated[str | None, Form(description="A JSON object stored with each image.")] = None,
) -> UploadResult:
    """Store new files (201); a request of duplicates only answers 200."""
    project = get_project(session, project_id)
    stored = service.upload_images(
        session,
        storage,
        project,
        [(f.filename, f.file) for f in files],
        split=split,
        class_name=label.strip() if label and label.strip() else None,
        meta=_parse_meta(meta),
        author=admin,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_image_pixels,
    )
    items = [
        UploadedFile(
            filename=s.filename,
            status=s.status,
            labeled=s.labeled,
            image=ImageOut.model_validate(s.image),
        )
        for s in stored
    ]
    created = sum(i.status == "created" for i in items)
    if created == 0:
        response.status_code = status.HTTP_200_OK
    return UploadResult(
        items=items,
        created=created,
        duplicates=len(items) - created,
        labeled=sum(i.labeled for i in items),
    )


@router.get("/projects/{project_id}/images", response_model=ImagePage)
def list_images(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    split: SplitName | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> ImagePage:
    get_project(session, project_id)
    require_member(session, user, project_id)
    images, total = service.list_images(
        session, project_id, split=split, limit=limit, offset=offset
    )
    items = [ImageOut.model_validate(i) for i in images]
    return ImagePage(items=items, total=total, limit=limit, offset=offset)


def _label_out(label: Label | None, classes: list[str]) -> CurrentLabel | None:
    if label is None:
        return None
    index = label.class_index
    return CurrentLabel(
        id=label.id,
        source=label.source,
        class_index=index,
        class_name=classes[index] if index is not None and 0 <= index < len(classes) else None,
        has_mask=label.mask_key is not None,
        author_name=label.author_name,
        created_at=label.created_at,
    )


@router.get("/images/{image_id}", response_model=ImageDetail)
def read_image(image_id: int, session: SessionDep, user: CurrentUser) -> ImageDetail:
    """The image's metadata and its current (newest) label, if any. With blind reads (the
    project wants 2 or more reads per image), an annotator's own newest label only."""
    image = service.get_image(session, image_id)
    project = get_project(session, image.project_id)
    author_id = reads_filter(session, user, project)
    label = _label_out(service.current_label(session, image_id, author_id), project.classes)
    return ImageDetail(**ImageOut.model_validate(image).model_dump(), label=label)


@router.get("/images/{image_id}/file", response_class=FileResponse)
def read_image_file(
    image_id: int, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> FileResponse:
    """The stored bytes; content-addressed, so clients may cache them for good."""
    image = service.get_image(session, image_id)
    require_member(session, user, image.project_id)
    path = storage.path(image.storage_key)
    if not path.is_file():
        raise NotFound(f"The file of image {image_id} is missing from storage.", code="FileMissing")
    return FileResponse(
        path,
        media_type=image.content_type,
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
