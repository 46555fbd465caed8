"""Schemas of active-learning rounds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel


class RoundCreate(BaseModel):
    project_id: int


class RoundOut(BaseModel):
    """A round: its status (the phase it is in), progress, metrics and resulting model.

    ``test_metrics`` repeats ``metrics["test"]`` (the learning curve's y value) when the
    worker has recorded it.
    """

    id: int
    project_id: int
    number: int
    status: str
    strategy: str
    alpha: float
    budget: int
    label_snapshot_id: int | None
    labeled_count: int | None
    progress: dict[str, Any]
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    attempt: int
    error: str | None
    cancel_requested: bool
    model_version_id: int | None
    requested_by: int | None
    heartbeat_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
