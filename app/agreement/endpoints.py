"""Inter-reader agreement of a project (issue 15): admins and the project's reviewers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.agreement.service import project_agreement
from app.deps import CurrentUser, SessionDep, StorageDep
from app.errors import Forbidden
from app.members.service import require_member
from app.models import MemberRole
from app.projects.service import get_project

router = APIRouter(tags=["agreement"])


@router.get("/projects/{project_id}/agreement")
def read_agreement(
    project_id: int, session: SessionDep, storage: StorageDep, user: CurrentUser
) -> dict[str, Any]:
    """How much the readers agree: Cohen's kappa (two readers per image) or Fleiss' kappa
    (more), the confusion between readers per class, the mean pairwise Dice and IoU of masks,
    the adjudication rate (images whose reads tie), and the same per annotator.

    Admins and the project's reviewers only (403 for its annotators, 404 for non-members).
    """
    project = get_project(session, project_id)
    role = require_member(session, user, project_id)
    if role == MemberRole.annotator:
        raise Forbidden(
            f"Agreement figures compare the readers of project {project_id}; they are for its "
            "reviewers and admins.",
            code="ReviewersOnly",
        )
    return project_agreement(session, storage, project)
