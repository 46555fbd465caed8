"""leasing indexes: open queue items, and leases by item and annotator

Leasing walks a project's queue in (round, rank) order looking for items with
``labels_needed > 0``. Without ``ix_queue_items_open`` every lease skips all the items
already done (thousands after a few rounds); with it the walk starts at the first open item.
For each candidate it asks whether the caller already holds, answered or skipped the item:
``ix_leases_item_user`` answers that from the item's few leases (SQLite otherwise picks
``ix_leases_user_state`` and reads every lease the caller ever had).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = "labels_needed > 0"


def upgrade() -> None:
    op.create_index(
        "ix_queue_items_open",
        "queue_items",
        ["project_id", "round_id", "rank"],
        unique=False,
        sqlite_where=sa.text(_OPEN),
        postgresql_where=sa.text(_OPEN),
    )
    op.create_index("ix_leases_item_user", "leases", ["queue_item_id", "user_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_leases_item_user", table_name="leases")
    op.drop_index("ix_queue_items_open", table_name="queue_items")
