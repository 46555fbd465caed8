"""Schemas of outgoing webhooks: subscriptions, the secret shown once, the delivery log."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from app.netpolicy import redact_url

WebhookEventKind = Literal["label.created", "round.done", "model.published"]


class WebhookCreate(BaseModel):
    """A subscription: ``url`` gets a signed POST for each event of a kind in ``events``.

    ``secret`` signs the bodies (HMAC-SHA256); leave it out to have one generated. Either way
    it is shown once, in the response to this request. ``url`` must reach a public address
    unless the deployment allows private ones (``CORELOOP_WEBHOOK_ALLOW_PRIVATE``).
    """

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl
    events: list[WebhookEventKind] = Field(min_length=1)
    secret: str | None = Field(default=None, min_length=16, max_length=200)


class WebhookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int
    url: str = Field(description="The URL; a password in it (user:pass@) is shown as ***.")
    events: list[str]
    active: bool
    created_at: datetime

    @field_validator("url")
    @classmethod
    def _redacted(cls, url: str) -> str:
        return redact_url(url)


class WebhookCreated(WebhookOut):
    """The new subscription with its secret: store it now, it is not shown again."""

    secret: str


class DeliveryOut(BaseModel):
    """One event sent (or being sent) to one subscription; the log an admin reads."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    subscription_id: int
    event_id: int
    event_kind: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
