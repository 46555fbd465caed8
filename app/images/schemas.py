"""Schemas of images, uploads and an image's current label."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SplitName = Literal["pool", "val", "test"]


class ImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int
    sha256: str
    filename: str = Field(description="The uploaded file's name: metadata only, never a path.")
    content_type: str
    width: int
    height: int
    split: str
    meta: dict[str, Any]
    created_at: datetime


class CurrentLabel(BaseModel):
    """The newest label of an image (labels are append-only; history is kept)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    source: str
    class_index: int | None
    class_name: str | None
    has_mask: bool
    author_name: str | None
    created_at: datetime


class ImageDetail(ImageOut):
    label: CurrentLabel | None


class UploadedFile(BaseModel):
    filename: str
    status: Literal["created", "duplicate"]
    labeled: bool = Field(description="Whether this request added a label to the image.")
    image: ImageOut


class UploadResult(BaseModel):
    items: list[UploadedFile]
    created: int
    duplicates: int
    labeled: int


class ImagePage(BaseModel):
    items: list[ImageOut]
    total: int
    limit: int
    offset: int
