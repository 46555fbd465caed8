"""Project membership (issue 15): who reaches a project, in what role, and who reads blind.

The rules, in one place:
- An **admin** reaches every project and sees every read.
- Any other user reaches a project only as its **member** (``project_members``), with the
  member role ``annotator`` or ``reviewer``. A non-member is answered 404, as if the project
  did not exist: project ids are not probed through the API.
- **Blind reads.** In a project that wants ``overlap`` >= 2 reads per image, an annotator sees
  only their own labels and masks, on every route (labels, an image's history and current
  label, /ui). Reviewers and admins see all reads.
- An **integration** credential (Label Studio) is not a member: it speaks for members, and the
  labels service checks the member it speaks for.
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.models import MemberRole, Project, ProjectMember, Role, User


class MemberNotFound(NotFound):
    code = "MemberNotFound"


class MemberExists(Conflict):
    code = "MemberExists"


class InvalidMember(InvalidInput):
    code = "InvalidMember"


def _no_project(project_id: int) -> NotFound:
    return NotFound(
        f"No project with id {project_id} that you are a member of; GET /projects lists yours.",
        code="ProjectNotFound",
    )


def member_role(session: Session, user: User, project_id: int) -> str | None:
    """``user``'s role in the project: "admin" for admins, the member role, or None."""
    if user.role == Role.admin:
        return Role.admin.value
    return session.scalar(
        select(ProjectMember.role).where(
            ProjectMember.project_id == project_id, ProjectMember.user_id == user.id
        )
    )


def require_member(session: Session, user: User, project_id: int) -> str:
    """``user``'s role in the project (see :func:`member_role`); 404 for a non-member."""
    role = member_role(session, user, project_id)
    if role is None:
        raise _no_project(project_id)
    return role


def require_annotator(session: Session, user: User, project_id: int) -> str:
    """As :func:`require_member`, for the routes that hand out and take reads (the queue,
    labels): reviewers settle reads in the review queue and do not read themselves."""
    return checked_annotator(user, project_id, member_role(session, user, project_id))


def checked_annotator(user: User, project_id: int, role: str | None) -> str:
    """:func:`require_annotator` on a member role already read (None: not a member), for the
    hot paths that read it in the same query as the rest."""
    if user.role == Role.admin:
        return Role.admin.value
    if role is None:
        raise _no_project(project_id)
    if role == MemberRole.reviewer:
        raise InvalidMember(
            f"User {user.name!r} is a reviewer of project {project_id}; reviewers do not take "
            "reads from its queue. An admin can add them as an annotator instead.",
            code="ReviewerCannotAnnotate",
        )
    return role


def require_ls_reach(session: Session, caller: User | None, project_id: int) -> None:
    """A ``/ls`` caller reaches the project: an open ``/ls`` (None), an integration credential
    (it speaks for Label Studio, whose members the labels service checks), an admin, or a
    member."""
    if caller is not None and caller.role != Role.integration:
        require_member(session, caller, project_id)


def visible_project_ids(session: Session, user: User) -> set[int] | None:
    """The ids of the projects ``user`` reaches; None for all (an admin)."""
    if user.role == Role.admin:
        return None
    return set(
        session.scalars(select(ProjectMember.project_id).where(ProjectMember.user_id == user.id))
    )


def sees_all_reads(role: str, project: Project) -> bool:
    """Whether a caller with this project role sees other readers' labels of ``project``."""
    return role != MemberRole.annotator or project.overlap < 2


def reads_filter(session: Session, user: User, project: Project) -> int | None:
    """The author whose labels alone ``user`` may see in ``project`` (blind reads), or None
    when they may see every read. 404 for a non-member."""
    role = require_member(session, user, project.id)
    return None if sees_all_reads(role, project) else user.id


def add_member(
    session: Session, project_id: int, user: User, role: str | None = None
) -> ProjectMember:
    """Make ``user`` a member of the project, as ``role`` (by default the user's own role when
    it is annotator or reviewer, else annotator); 409 when they already are."""
    if user.role == Role.admin:
        raise InvalidMember(
            f"User {user.name!r} is an admin, who reaches every project without membership."
        )
    if user.role == Role.integration:
        raise InvalidMember(
            f"User {user.name!r} is an integration credential; it speaks for members and is "
            "not one itself."
        )
    if role is None:
        role = user.role if user.role in set(MemberRole) else MemberRole.annotator.value
    if role not in set(MemberRole):
        raise InvalidMember(f"A member's role is 'annotator' or 'reviewer', not {role!r}.")
    member = ProjectMember(project_id=project_id, user_id=user.id, role=role)
    try:
        with session.begin_nested():  # a concurrent add of the same member loses here
            session.add(member)
            session.flush()
    except IntegrityError as exc:
        raise MemberExists(
            f"User {user.name!r} is already a member of project {project_id}; remove them "
            "first to change their role."
        ) from exc
    return member


def list_members(session: Session, project_id: int) -> list[tuple[ProjectMember, User]]:
    rows = session.execute(
        select(ProjectMember, User)
        .join(User, User.id == ProjectMember.user_id)
        .where(ProjectMember.project_id == project_id)
        .order_by(ProjectMember.id)
    )
    return [(member, user) for member, user in rows.all()]


def remove_member(session: Session, project_id: int, user_id: int) -> None:
    """End a membership; 404 when there is none. The user's labels stay (they are history);
    their open leases of the project stop counting as soon as they expire."""
    result = session.execute(
        delete(ProjectMember).where(
            ProjectMember.project_id == project_id, ProjectMember.user_id == user_id
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise MemberNotFound(f"User {user_id} is not a member of project {project_id}.")
