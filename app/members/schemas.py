"""Schemas of project membership (issue 15)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MemberCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(ge=1)
    role: Literal["annotator", "reviewer"] | None = Field(
        default=None,
        description="The member's role in this project; by default the user's own role when "
        "it is 'annotator' or 'reviewer'.",
    )


class MemberOut(BaseModel):
    user_id: int
    name: str
    role: str = Field(description="'annotator' or 'reviewer' in this project.")
    created_at: datetime
