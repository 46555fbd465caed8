"""warm start: a project's self-supervised pretraining job, and the option that queues it

``warm_starts`` holds one row per project: the SimCLR pretraining of the backbone on the
project's pool images (``worker.pretrain``), run like a round (status, attempt, heartbeat,
progress, cancel) and, once done, the key of the ResNet-18 state_dict later rounds start from.
``projects.warm_start`` (default false: existing projects keep today's behaviour) queues it
when the project's first round is created.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("warm_start", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "warm_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("checkpoint_key", sa.String(length=500), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("requested_by", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_warm_starts_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["requested_by"], ["users.id"], name=op.f("fk_warm_starts_requested_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_warm_starts")),
        sa.UniqueConstraint("project_id", name=op.f("uq_warm_starts_project_id")),
    )


def downgrade() -> None:
    op.drop_table("warm_starts")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("warm_start")
