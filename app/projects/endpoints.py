"""Projects: admins create and configure them; their members (and admins) read them."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import AdminUser, CurrentUser, SessionDep
from app.members.service import require_member, visible_project_ids
from app.models import Project
from app.projects import service
from app.projects.schemas import (
    ProjectCreate,
    ProjectDetail,
    ProjectOut,
    ProjectUpdate,
    project_out,
)

router = APIRouter(prefix="/projects", tags=["projects"])


def _detail(session: SessionDep, project: Project) -> ProjectDetail:
    counts = service.project_counts(session, project)
    return ProjectDetail(**project_out(project).model_dump(), counts=counts)


@router.post("", response_model=ProjectDetail, status_code=status.HTTP_201_CREATED)
def create_project(body: ProjectCreate, session: SessionDep, _: AdminUser) -> ProjectDetail:
    return _detail(session, service.create_project(session, body))


@router.get("", response_model=list[ProjectOut])
def list_projects(session: SessionDep, user: CurrentUser) -> list[ProjectOut]:
    """Every project for an admin; the projects they are a member of for anyone else."""
    visible = visible_project_ids(session, user)
    projects = service.list_projects(session)
    return [project_out(p) for p in projects if visible is None or p.id in visible]


@router.get("/{project_id}", response_model=ProjectDetail)
def read_project(project_id: int, session: SessionDep, user: CurrentUser) -> ProjectDetail:
    require_member(session, user, project_id)
    return _detail(session, service.get_project(session, project_id))


@router.patch("/{project_id}", response_model=ProjectDetail)
def update_project(
    project_id: int, body: ProjectUpdate, session: SessionDep, _: AdminUser
) -> ProjectDetail:
    return _detail(session, service.update_project(session, project_id, body))
