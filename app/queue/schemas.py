"""Schemas of the annotation queue and of leases."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class Scores(BaseModel):
    """The selection scores of a queue item (null for items chosen at random)."""

    min_distance: float | None
    predicted_loss: float | None
    score: float | None


class PredictionOut(BaseModel):
    """The current model's output for the image: class probabilities or a mask URL."""

    model_version_id: int
    class_probs: list[float] | None
    mask_url: str | None


class QueueEntry(BaseModel):
    """One leased item of the caller's queue."""

    lease_id: int
    queue_item_id: int
    image_id: int
    image_url: str
    round: int
    rank: int
    scores: Scores
    expires_at: datetime
    prediction: PredictionOut | None


class LeaseOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    queue_item_id: int
    project_id: int
    image_id: int
    user_id: int
    state: str
    expires_at: datetime
    created_at: datetime
    updated_at: datetime
