"""Alembic owns the schema: upgrade, downgrade and upgrade again; no drift from the models."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text

from app.db import make_engine
from app.migrate import alembic_config, downgrade, upgrade
from app.settings import Settings
from tests.conftest import new_database_url


def test_one_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert len(heads) == 1, f"migration branches: {heads}"


def test_upgrade_downgrade_and_no_drift(db_kind: str, tmp_path: Path) -> None:
    url = new_database_url(db_kind, tmp_path)
    engine = make_engine(Settings(data_dir=tmp_path, database_url=url))
    try:
        upgrade(engine)
        downgrade(engine, "base")
        upgrade(engine)
    finally:
        engine.dispose()
    command.check(alembic_config(url))  # raises when the models and the migrations differ


def test_membership_migration_keeps_what_users_could_reach(db_kind: str, tmp_path: Path) -> None:
    """0007: before membership every annotator reached every project; afterwards each is a
    member (as annotator) of every project that existed. Admins and integrations get no row."""
    url = new_database_url(db_kind, tmp_path)
    engine = make_engine(Settings(data_dir=tmp_path, database_url=url))
    now = "2026-12-01 10:00:00"
    try:
        upgrade(engine, "0006")
        with engine.begin() as conn:
            for i, role in enumerate(["annotator", "annotator", "admin", "integration"], 1):
                conn.execute(
                    text(
                        "INSERT INTO users (id, name, role, token_hash, created_at) "
                        "VALUES (:id, :name, :role, :hash, :now)"
                    ),
                    {"id": i, "name": f"u{i}", "role": role, "hash": f"h{i}", "now": now},
                )
            for pid in (1, 2):
                conn.execute(
                    text(
                        "INSERT INTO projects (id, name, task, classes, initial_fraction, "
                        "strategy, alpha, overlap, lease_ttl_seconds, require_lease, auto_round, "
                        "image_size, epochs, batch_size, cold_start, exclude_labeled_groups, "
                        "warm_start, created_at) VALUES (:id, :name, 'classification', "
                        "'[\"a\", \"b\"]', 0.1, 'random', 0.25, 1, 600, false, 'off', 64, 1, 8, "
                        "'random', false, false, :now)"
                    ),
                    {"id": pid, "name": f"p{pid}", "now": now},
                )
        upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT project_id, user_id, role FROM project_members ORDER BY 1, 2")
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [
        (1, 1, "annotator"),
        (1, 2, "annotator"),
        (2, 1, "annotator"),
        (2, 2, "annotator"),
    ]
