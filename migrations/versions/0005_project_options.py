"""project options: cold start and groups

``projects.cold_start`` picks round 0's initial set ("random", "typiclust" or "probcover", in
the warm-start embedding); ``projects.group_key`` names an image-metadata key (HAM10000:
``lesion_id``) whose images no batch holds twice; ``projects.exclude_labeled_groups`` also
keeps a batch out of groups that already have a labeled image. Existing projects keep today's
behaviour: random, no groups.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 19:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("cold_start", sa.String(length=20), nullable=False, server_default="random")
        )
        batch_op.add_column(sa.Column("group_key", sa.String(length=100), nullable=True))
        batch_op.add_column(
            sa.Column(
                "exclude_labeled_groups", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("exclude_labeled_groups")
        batch_op.drop_column("group_key")
        batch_op.drop_column("cold_start")
