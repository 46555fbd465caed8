"""Membership for tests of everything but membership itself.

Annotators and reviewers reach only the projects they are members of (``app.members.service``).
Most tests are about something else, so their fixtures (``make_user``, ``make_project``, the
browser and Label Studio seeders) make every annotator or reviewer a member of every project,
as the migration did for the data that existed before membership. ``member=False`` on those
fixtures opts out; ``tests/api/test_members.py`` tests membership itself.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

_GRANT_ALL = text(
    "INSERT INTO project_members (project_id, user_id, role, created_at) "
    "SELECT projects.id, users.id, users.role, CURRENT_TIMESTAMP "
    "FROM projects CROSS JOIN users "
    "WHERE users.role IN ('annotator', 'reviewer') AND NOT EXISTS ("
    "SELECT 1 FROM project_members m "
    "WHERE m.project_id = projects.id AND m.user_id = users.id)"
)


def grant_all(session: Session) -> None:
    """Make every annotator and reviewer a member (in their own role) of every project."""
    session.execute(_GRANT_ALL)
