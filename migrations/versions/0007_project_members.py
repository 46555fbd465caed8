"""project members: who may work on a project, and as what (issue 15)

``project_members`` holds one row per (project, user) with the member's role in that project,
``annotator`` or ``reviewer``. Admins need no row. Before this migration every signed-in user
reached every project, so it makes every existing annotator a member (as annotator) of every
existing project: nobody loses access they had. Projects created later start with no members.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "project_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_members_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_project_members_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project_members")),
        sa.UniqueConstraint(
            "project_id", "user_id", name=op.f("uq_project_members_project_id_user_id")
        ),
    )
    op.create_index("ix_project_members_user", "project_members", ["user_id"], unique=False)
    # Everyone who could reach a project keeps it: every annotator of every existing project.
    op.execute(
        "INSERT INTO project_members (project_id, user_id, role, created_at) "
        "SELECT projects.id, users.id, 'annotator', CURRENT_TIMESTAMP "
        "FROM projects CROSS JOIN users WHERE users.role = 'annotator'"
    )


def downgrade() -> None:
    op.drop_index("ix_project_members_user", table_name="project_members")
    op.drop_table("project_members")
