"""Project members (issue 15): admins add, list and remove them."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import AdminUser, SessionDep
from app.members import service
from app.members.schemas import MemberCreate, MemberOut
from app.models import ProjectMember, User
from app.projects.service import get_project
from app.users.service import get_user

router = APIRouter(prefix="/projects/{project_id}/members", tags=["members"])


def _out(member: ProjectMember, user: User) -> MemberOut:
    return MemberOut(
        user_id=user.id, name=user.name, role=member.role, created_at=member.created_at
    )


@router.post("", status_code=status.HTTP_201_CREATED)
def add_member(project_id: int, body: MemberCreate, session: SessionDep, _: AdminUser) -> MemberOut:
    """Make a user a member: 'annotator' (takes reads from the queue) or 'reviewer'.

    409 ``MemberExists`` when they already are; 422 ``InvalidMember`` for an admin (who reaches
    every project) or an integration credential.
    """
    get_project(session, project_id)
    user = get_user(session, body.user_id)
    return _out(service.add_member(session, project_id, user, body.role), user)


@router.get("")
def list_members(project_id: int, session: SessionDep, _: AdminUser) -> list[MemberOut]:
    get_project(session, project_id)
    return [_out(member, user) for member, user in service.list_members(session, project_id)]


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
def remove_member(project_id: int, user_id: int, session: SessionDep, _: AdminUser) -> None:
    """End a membership: the user no longer reaches the project. Their labels stay."""
    get_project(session, project_id)
    service.remove_member(session, project_id, user_id)
