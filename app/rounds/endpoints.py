"""Active-learning rounds: start (admin), read, list (the learning curve), cancel (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminUser, CurrentUser, SessionDep, SettingsDep
from app.members.service import require_member
from app.rounds import service as rounds_service
from app.rounds.schemas import RoundCreate, RoundOut

router = APIRouter(tags=["rounds"])


@router.post("/rounds", status_code=202)
def create_round(
    body: RoundCreate, session: SessionDep, settings: SettingsDep, admin: AdminUser
) -> RoundOut:
    """Queue the project's next round; the worker picks it up after the commit.

    409 ``RoundAlreadyActive`` while another round of the project is queued or running.
    """
    created = rounds_service.create_round(session, settings, body.project_id, admin.id)
    return rounds_service.rounds_out(session, [created])[0]


@router.get("/rounds")
def list_rounds(project_id: int, session: SessionDep, user: CurrentUser) -> list[RoundOut]:
    """The project's rounds by number: the learning curve (labeled_count vs test_metrics)."""
    require_member(session, user, project_id)
    return rounds_service.rounds_out(session, rounds_service.list_rounds(session, project_id))


@router.get("/rounds/{round_id}")
def get_round(round_id: int, session: SessionDep, user: CurrentUser) -> RoundOut:
    found = rounds_service.get_round(session, round_id)
    require_member(session, user, found.project_id)
    return rounds_service.rounds_out(session, [found])[0]


@router.post("/rounds/{round_id}/cancel")
def cancel_round(round_id: int, session: SessionDep, admin: AdminUser) -> RoundOut:
    """Queued: cancelled at once. Running: ``cancel_requested`` is set and the worker stops."""
    cancelled = rounds_service.cancel_round(session, round_id, admin.id)
    return rounds_service.rounds_out(session, [cancelled])[0]
