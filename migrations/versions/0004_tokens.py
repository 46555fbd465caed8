"""tokens: per-author idempotency keys, token expiry

Idempotency keys were unique over all labels, so a key used by one user (an annotator)
answered another user's request (an admin's import stored nothing). They are now unique per
author, ``(author_id, idempotency_key)``; labels without an author (CLI imports) keep one key
space of their own through a partial unique index. ``users.token_expires_at`` (nullable:
never) bounds a token's life; revoking a token replaces its hash.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 18:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NO_AUTHOR = "author_id IS NULL"


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("token_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_constraint("uq_labels_idempotency_key", type_="unique")
        batch_op.create_unique_constraint(
            "uq_labels_author_id_idempotency_key", ["author_id", "idempotency_key"]
        )
    op.create_index(
        "uq_labels_idempotency_key_no_author",
        "labels",
        ["idempotency_key"],
        unique=True,
        sqlite_where=sa.text(_NO_AUTHOR),
        postgresql_where=sa.text(_NO_AUTHOR),
    )


def downgrade() -> None:
    op.drop_index("uq_labels_idempotency_key_no_author", table_name="labels")
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_constraint("uq_labels_author_id_idempotency_key", type_="unique")
        batch_op.create_unique_constraint("uq_labels_idempotency_key", ["idempotency_key"])
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("token_expires_at")
