"""Outgoing webhooks of a project (admin): subscribe, list, delete, read the delivery log."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from fastapi import status as http

from app.deps import AdminUser, SessionDep, SettingsDep
from app.webhooks import service
from app.webhooks.schemas import DeliveryOut, WebhookCreate, WebhookCreated, WebhookOut

router = APIRouter(prefix="/projects/{project_id}/webhooks", tags=["webhooks"])


@router.post("", status_code=http.HTTP_201_CREATED)
def create_webhook(
    project_id: int,
    body: WebhookCreate,
    session: SessionDep,
    settings: SettingsDep,
    admin: AdminUser,
) -> WebhookCreated:
    """Subscribe ``url`` to ``events``. The response holds the signing secret: the only time
    it is shown. Each delivery is a POST of JSON with ``X-Coreloop-Signature: sha256=<hex
    HMAC-SHA256 of the raw body, keyed with the secret>`` and ``X-Coreloop-Event``.

    ``url`` must reach a public address (422 ``WebhookAddressRefused`` for loopback, private,
    link-local or metadata addresses) unless ``CORELOOP_WEBHOOK_ALLOW_PRIVATE`` is set."""
    created = service.create_subscription(
        session, project_id, body, admin.id, allow_private=settings.webhook_allow_private
    )
    return WebhookCreated(**WebhookOut.model_validate(created).model_dump(), secret=created.secret)


@router.get("")
def list_webhooks(
    project_id: int,
    session: SessionDep,
    _: AdminUser,
    include_inactive: bool = False,
) -> list[WebhookOut]:
    """The project's subscriptions (without their secrets); deleted ones with
    ``include_inactive=true``."""
    found = service.list_subscriptions(session, project_id, include_inactive=include_inactive)
    return [WebhookOut.model_validate(s) for s in found]


@router.delete("/{subscription_id}", status_code=http.HTTP_204_NO_CONTENT)
def delete_webhook(
    project_id: int, subscription_id: int, session: SessionDep, _: AdminUser
) -> Response:
    """Stop sending to the subscription (pending deliveries end ``failed``); its delivery log
    stays readable."""
    service.deactivate_subscription(session, project_id, subscription_id)
    return Response(status_code=http.HTTP_204_NO_CONTENT)


@router.get("/{subscription_id}/deliveries")
def list_deliveries(
    project_id: int,
    subscription_id: int,
    session: SessionDep,
    _: AdminUser,
    status: Literal["pending", "delivered", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before_id: int | None = None,
) -> list[DeliveryOut]:
    """The delivery log, newest first: status, attempts, the last HTTP status or error, and
    when the next attempt is due. Page with ``before_id`` (the last id of the previous page)."""
    found = service.list_deliveries(
        session, project_id, subscription_id, status=status, limit=limit, before_id=before_id
    )
    return [DeliveryOut.model_validate(d) for d in found]
