"""Schemas of a project's self-supervised warm start."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class WarmStartOut(BaseModel):
    """A project's warm start: status (``queued``, ``training``, ``done``, ``failed``,
    ``cancelled``) and progress like a round's (``phase``, ``step``, ``epoch``, ``epochs``,
    ``loss``); when done, ``metrics`` (loss history, settings, seconds) and the checkpoint
    every later round of the project starts from."""

    id: int
    project_id: int
    status: str
    progress: dict[str, Any]
    metrics: dict[str, Any]
    attempt: int
    error: str | None
    cancel_requested: bool
    checkpoint_key: str | None
    checkpoint_sha256: str | None
    requested_by: int | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
