"""Labels: POST /labels (JSON, or multipart with a mask PNG), history, masks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.deps import CurrentUser, SessionDep, SettingsDep, StorageDep, in_unit_of_work
from app.error_schemas import ErrorEnvelope
from app.errors import CoreloopError, InvalidInput, PayloadTooLarge
from app.labels import service as labels_service
from app.labels.schemas import LabelCreate, LabelOut
from app.openapi import DESCRIPTIONS, hand_parsed_body

router = APIRouter(tags=["labels"])

_FORM_FIELDS = ("image_id", "lease_id", "idempotency_key", "class_index", "class_name")


@dataclass(frozen=True)
class LabelSubmission:
    data: LabelCreate
    mask_png: bytes | None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request is larger than {limit} bytes.")


def _validated(values: Any, *, from_json: bool) -> LabelCreate:
    try:
        if from_json:
            return LabelCreate.model_validate_json(values)
        return LabelCreate.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc


async def _from_form(request: Request, limit: int) -> LabelSubmission:
    form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS) + 2)
    values: dict[str, Any] = {}
    mask_png: bytes | None = None
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "mask":
                raise InvalidInput(f"Unexpected file field {name!r}; the mask PNG goes in 'mask'.")
            mask_png = await value.read(limit + 1)
            if len(mask_png) > limit:
                raise _too_large(limit)
        elif name == "mask_rle":
            try:
                values[name] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"mask_rle is not JSON: {exc}.", code="InvalidRle") from exc
        elif value != "":
            values[name] = value
    return LabelSubmission(_validated(values, from_json=False), mask_png)


async def label_submission(
    request: Request, settings: SettingsDep, _: CurrentUser
) -> LabelSubmission:
    """Parse POST /labels: a JSON ``LabelCreate``, or the same fields as multipart form data
    with the mask as a PNG file field ``mask`` (``mask_rle`` may be a JSON string there).

    Depends on the caller so that an unauthenticated request is refused before its body is
    read."""
    limit = settings.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _from_form(request, limit)
    if content_type in ("application/json", ""):
        body = await request.body()
        if len(body) > limit:
            raise _too_large(limit)
        return LabelSubmission(_validated(body, from_json=True), None)
    raise CoreloopError(
        f"Send application/json or multipart/form-data, not {content_type!r}.",
        code="UnsupportedMediaType",
        status_code=415,
    )


LabelBody = Annotated[LabelSubmission, Depends(label_submission)]


# The body label_submission reads, declared for clients (FastAPI cannot see it).
_LABEL_FORM: dict[str, Any] = {
    "type": "object",
    "required": ["image_id", "idempotency_key"],
    "additionalProperties": False,
    "properties": {
        "image_id": {"type": "integer"},
        "lease_id": {"type": "integer"},
        "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
        "class_index": {"type": "integer"},
        "class_name": {"type": "string", "minLength": 1, "maxLength": 200},
        "mask_rle": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "An RleMask as a JSON string (or send the mask as a PNG in 'mask').",
        },
        "mask": {
            "type": "string",
            "format": "binary",
            "description": "The mask as a PNG, the image's size: 0 background, >0 foreground.",
        },
    },
}


@router.post(
    "/labels",
    status_code=201,
    responses={
        200: {"model": LabelOut, "description": "A retry: the first label, unchanged"},
        413: {"model": ErrorEnvelope, "description": "PayloadTooLarge"},
        415: {"model": ErrorEnvelope, "description": "UnsupportedMediaType: not JSON or multipart"},
        422: {"model": ErrorEnvelope, "description": DESCRIPTIONS["422"]},
    },
    openapi_extra=hand_parsed_body(
        LabelCreate,
        _LABEL_FORM,
        form_encoding={"mask": {"contentType": "image/png"}},
        description="A LabelCreate as JSON, or its fields as multipart form data with the "
        "mask as a PNG file field 'mask'.",
    ),
)
async def create_label(
    submission: LabelBody,
    request: Request,
    response: Response,
    settings: SettingsDep,
    storage: StorageDep,
    user: CurrentUser,
) -> LabelOut:
    """Store a label (201), or return the first one for a repeated idempotency key (200)."""
    data, mask_png = submission.data, submission.mask_png
    # A mask is decoded, checked and encoded before the transaction, not under the write lock.
    mask = None
    if data.mask_rle is not None or mask_png is not None:
        sessions = request.app.state.sessions
        mask = await anyio.to_thread.run_sync(
            labels_service.prepare_submitted_mask, sessions, data, mask_png
        )

    # The hot path: the transaction in one step, on the loop or a thread (app.deps.in_unit_of_work).
    def work(session: Session) -> tuple[LabelOut, bool]:
        return labels_service.submit_label(
            session, settings, storage, user, data, mask_png, mask=mask
        )

    out, created = await in_unit_of_work(request, work)
    if not created:
        response.status_code = 200
    return out


@router.get("/labels/{label_id}")
def get_label(label_id: int, session: SessionDep, user: CurrentUser) -> LabelOut:
    """A label (404 for another reader's label of a project with blind reads)."""
    label = labels_service.get_label(session, user, label_id)
    return labels_service.label_response(session, label)


@router.get(
    "/labels/{label_id}/mask",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The mask, 0/255 PNG"}},
)
def get_label_mask(
    label_id: int, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> Response:
    key = labels_service.label_mask_key(session, user, label_id)
    return Response(content=storage.read_bytes(key), media_type="image/png")


@router.get("/images/{image_id}/labels")
def list_image_labels(image_id: int, session: SessionDep, user: CurrentUser) -> list[LabelOut]:
    """The image's label history, newest first (the first is the current label). With blind
    reads (the project wants 2 or more reads per image), an annotator sees their own only."""
    return labels_service.list_image_labels(session, user, image_id)
