"""Schemas of users and their API tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

UserName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: UserName
    role: Literal["admin", "annotator"] = "annotator"


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    created_at: datetime


class UserCreated(UserOut):
    """A new user with their API token: the only time the token is shown."""

    token: str = Field(description="Send as 'Authorization: Bearer <token>'; shown only once.")
