"""The error envelope as the OpenAPI schema declares it (``app.errors`` renders it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ValidationIssue(BaseModel):
    """One problem with the request, as pydantic reports it."""

    loc: list[str | int] = Field(description="Where: the location (body, query, path...), keys.")
    msg: str
    type: str


class ErrorEnvelope(BaseModel):
    """Every error: ``error`` is the code name, ``detail`` says what to do about it.

    ``detail`` is a sentence, except for ``ValidationError`` (a request that does not match
    the schema), where it lists the issues.
    """

    error: str = Field(
        description="The code name, e.g. NotFound, ValidationError, Forbidden, LeaseExpired."
    )
    detail: str | list[ValidationIssue]
