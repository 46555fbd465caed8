"""review: the reviewer's queue of disputed and spot-checked images (issue 15)

``review_items`` holds the images a reviewer must look at: their reads disagree
(``disputed``) or they were drawn for a spot check (``spot_check``); at most one open item per
image; an open item is leased to one reviewer at a time. ``review_skips`` records who skipped
what. ``projects.review_sample`` (default 0: no spot checks) and ``projects.mask_agreement``
(default 0.7: reads of a mask whose pairwise Dice falls below it are disputed) configure them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 22:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("review_sample", sa.Float(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("mask_agreement", sa.Float(), nullable=False, server_default="0.7")
        )
    op.create_table(
        "review_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(length=20), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("leased_by", sa.Integer(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("settled_by", sa.Integer(), nullable=True),
        sa.Column("settled_label_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_review_items_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["leased_by"], ["users.id"], name=op.f("fk_review_items_leased_by_users")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_review_items_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["settled_by"], ["users.id"], name=op.f("fk_review_items_settled_by_users")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_items")),
    )
    op.create_index(
        "ix_review_items_project_state",
        "review_items",
        ["project_id", "state", "id"],
        unique=False,
    )
    op.create_index(
        "uq_review_items_one_open",
        "review_items",
        ["image_id"],
        unique=True,
        sqlite_where=sa.text("state = 'open'"),
        postgresql_where=sa.text("state = 'open'"),
    )
    op.create_table(
        "review_skips",
        sa.Column("review_item_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["review_item_id"],
            ["review_items.id"],
            name=op.f("fk_review_skips_review_item_id_review_items"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_review_skips_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("review_item_id", "user_id", name=op.f("pk_review_skips")),
    )


def downgrade() -> None:
    op.drop_table("review_skips")
    op.drop_index("uq_review_items_one_open", table_name="review_items")
    op.drop_index("ix_review_items_project_state", table_name="review_items")
    op.drop_table("review_items")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("mask_agreement")
        batch_op.drop_column("review_sample")
