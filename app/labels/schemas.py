"""Schemas of labels: what an annotator posts and what the server returns."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class RleMask(BaseModel):
    """A COCO run-length encoded binary mask.

    ``size`` is ``[height, width]``; ``counts`` is either the compressed string of
    ``pycocotools.mask.encode`` or the plain list of run lengths (column-major, starting
    with a run of zeros).
    """

    size: tuple[int, int]
    counts: str | list[int]


class LabelCreate(BaseModel):
    """A label for one image: a class (by index or name) or a mask (RLE here, or a PNG upload).

    ``idempotency_key`` makes a retry safe: the same key returns the first result.
    """

    model_config = ConfigDict(extra="forbid")

    image_id: int
    lease_id: int | None = None
    idempotency_key: str = Field(min_length=1, max_length=200)
    class_index: int | None = None
    class_name: str | None = Field(default=None, min_length=1, max_length=200)
    mask_rle: RleMask | None = None


class LabelOut(BaseModel):
    id: int
    project_id: int
    image_id: int
    author_id: int | None
    author_name: str | None
    source: str
    class_index: int | None
    class_name: str | None
    mask_url: str | None
    lease_id: int | None
    idempotency_key: str
    created_at: datetime
