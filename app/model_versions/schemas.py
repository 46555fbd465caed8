"""Schemas of model versions: a round's trained checkpoint and its metrics."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class ModelVersionOut(BaseModel):
    """One trained model: the round that made it, its metrics and where to download it.

    ``test_metrics`` repeats ``metrics["test"]`` (the held-out evaluation) when the worker
    recorded it; ``metrics`` also holds the per-epoch ``history`` and the training set size.
    """

    id: int
    project_id: int
    round_id: int
    round_number: int
    sha256: str = Field(description="SHA-256 of the checkpoint file.")
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None
    labeled_count: int | None = Field(description="Labels the round trained on.")
    download_url: str = Field(description="GET it with an admin token for the checkpoint.")
    created_at: datetime
