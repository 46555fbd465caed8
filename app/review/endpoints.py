"""The reviewer's queue (issue 15): disputed and spot-checked images, leased to reviewers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentUser, SessionDep, StorageDep
from app.review import service
from app.review.schemas import ReviewEntry, ReviewItemOut, ReviewSettle

router = APIRouter(prefix="/review", tags=["review"])


@router.get("")
def get_review(
    project_id: int,
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> list[ReviewEntry]:
    """The caller's leased review items, then newly leased ones, with every read of each image
    side by side. Reviewers and admins only (403 ``ReviewersOnly`` for annotators)."""
    return service.lease_review_items(session, user, project_id, limit)


@router.post("/{item_id}/settle")
def settle(
    item_id: int, body: ReviewSettle, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> ReviewItemOut:
    """Keep one read (``label_id``), give the class or mask, or ``send_back`` for another read.
    409 ``ReviewNotOpen`` once settled, ``ReviewLeasedByOther`` while another reviewer holds it.
    """
    return ReviewItemOut.model_validate(service.settle(session, storage, user, item_id, body))


@router.post("/{item_id}/skip")
def skip(item_id: int, session: SessionDep, user: CurrentUser) -> ReviewItemOut:
    """Give the item back and never be offered it again."""
    return ReviewItemOut.model_validate(service.release(session, user, item_id, skip=True))


@router.post("/{item_id}/release")
def release(item_id: int, session: SessionDep, user: CurrentUser) -> ReviewItemOut:
    """Give the item back (it may be offered to the caller again)."""
    return ReviewItemOut.model_validate(service.release(session, user, item_id, skip=False))
