"""A project's self-supervised warm start: start (admin), read, cancel (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminUser, CurrentUser, SessionDep, SettingsDep
from app.members.service import require_member
from app.warm_start import service
from app.warm_start.schemas import WarmStartOut

router = APIRouter(tags=["warm start"])


@router.post("/projects/{project_id}/warm-start", status_code=202)
def start_warm_start(
    project_id: int, session: SessionDep, settings: SettingsDep, admin: AdminUser
) -> WarmStartOut:
    """Queue the project's warm start (SimCLR on its pool images; every later round trains
    from it), or restart a failed or cancelled one from its last saved epoch.

    409 ``WarmStartActive`` while it is queued or running, ``WarmStartDone`` once done.
    """
    row = service.start_warm_start(session, settings, project_id, admin.id)
    return service.warm_start_out(row)


@router.get("/projects/{project_id}/warm-start")
def get_warm_start(project_id: int, session: SessionDep, user: CurrentUser) -> WarmStartOut:
    """Status and progress (phase, epoch / epochs, loss); 404 ``WarmStartNotFound`` if none."""
    require_member(session, user, project_id)
    return service.warm_start_out(service.get_warm_start(session, project_id))


@router.post("/projects/{project_id}/warm-start/cancel")
def cancel_warm_start(project_id: int, session: SessionDep, admin: AdminUser) -> WarmStartOut:
    """Queued: cancelled at once. Running: ``cancel_requested`` is set and the worker stops."""
    return service.warm_start_out(service.cancel_warm_start(session, project_id, admin.id))
