"""Schemas of users and their API tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

UserName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ExpiresInDays = Annotated[
    int | None,
    Field(default=None, ge=1, le=3650, description="The token expires after this many days."),
]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: UserName
    role: Literal["admin", "annotator", "reviewer", "integration"] = Field(
        default="annotator",
        description="'integration': a Label Studio connection's credential, for /ls/* only. "
        "'reviewer': settles disagreements between readers in the projects they are a "
        "reviewer of. Annotators and reviewers reach only the projects they are members of.",
    )
    expires_in_days: ExpiresInDays = None


class TokenRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires_in_days: ExpiresInDays = None


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    token_expires_at: datetime | None = Field(description="None: the token never expires.")
    created_at: datetime


class UserCreated(UserOut):
    """A new user with their API token: the only time the token is shown."""

    token: str = Field(description="Send as 'Authorization: Bearer <token>'; shown only once.")
