"""Schemas of the reviewer's queue (issue 15)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.labels.schemas import RleMask


class ReviewRead(BaseModel):
    """One reader's read of the image, for the side-by-side view."""

    label_id: int
    author_id: int | None
    author_name: str | None
    class_index: int | None
    class_name: str | None
    mask_url: str | None


class ReviewEntry(BaseModel):
    id: int
    project_id: int
    image_id: int
    image_url: str
    reason: str = Field(
        description="'disputed' (the reads disagree), 'suspect' (the model contradicts the "
        "agreed label) or 'spot_check'."
    )
    detail: dict[str, Any]
    expires_at: datetime | None = Field(description="The caller's lease ends then.")
    reads: list[ReviewRead]


class ReviewSettle(BaseModel):
    """Exactly one of: a read to keep (``label_id``), a class (``class_index`` or
    ``class_name``), a mask (``mask_rle``), or ``send_back`` for another read."""

    model_config = ConfigDict(extra="forbid")

    label_id: int | None = None
    class_index: int | None = None
    class_name: str | None = Field(default=None, min_length=1, max_length=200)
    mask_rle: RleMask | None = None
    send_back: bool = False

    @model_validator(mode="after")
    def _one_choice(self) -> ReviewSettle:
        given = [
            self.label_id is not None,
            self.class_index is not None or self.class_name is not None,
            self.mask_rle is not None,
            self.send_back,
        ]
        if sum(given) != 1:
            raise ValueError(
                "give exactly one of label_id, class_index/class_name, mask_rle or send_back"
            )
        return self


class ReviewItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int
    image_id: int
    reason: str
    state: str
    settled_by: int | None
    settled_label_id: int | None
    settled_at: datetime | None
