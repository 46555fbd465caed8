"""The annotator's queue and leases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from app.deps import CurrentUser, SessionDep, SettingsDep, StorageDep, in_unit_of_work
from app.queue import service as queue_service
from app.queue.schemas import LeaseOut, QueueEntry

router = APIRouter(tags=["queue"])


@router.get("/queue")
async def get_queue(
    project_id: int,
    request: Request,
    settings: SettingsDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1)] = 10,
) -> list[QueueEntry]:
    """The caller's active leases, then newly leased items in (round, rank) order.

    ``limit`` is capped by the server's ``queue_max_limit``.
    """
    # The hot path: the transaction in one step, on the loop or a thread (app.deps.in_unit_of_work).
    return await in_unit_of_work(
        request,
        lambda session: queue_service.lease_next_items(session, settings, user, project_id, limit),
    )


@router.post("/leases/{lease_id}/renew")
def renew_lease(lease_id: int, session: SessionDep, user: CurrentUser) -> LeaseOut:
    """Extend the lease by the project's TTL (409 ``LeaseExpired`` once it has expired)."""
    return LeaseOut.model_validate(queue_service.renew_lease(session, user, lease_id))


@router.post("/leases/{lease_id}/release")
def release_lease(lease_id: int, session: SessionDep, user: CurrentUser) -> LeaseOut:
    """Give the item back to the queue."""
    return LeaseOut.model_validate(queue_service.release_lease(session, user, lease_id))


@router.post("/leases/{lease_id}/skip")
def skip_lease(lease_id: int, session: SessionDep, user: CurrentUser) -> LeaseOut:
    """Give the item back and never be offered it again."""
    return LeaseOut.model_validate(queue_service.skip_lease(session, user, lease_id))


@router.get(
    "/predictions/{prediction_id}/mask",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The predicted mask"}},
)
def get_prediction_mask(
    prediction_id: int, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> Response:
    key = queue_service.prediction_mask_key(session, user, prediction_id)
    return Response(content=storage.read_bytes(key), media_type="image/png")
