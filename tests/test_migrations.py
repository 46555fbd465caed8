"""Alembic owns the schema: upgrade, downgrade and upgrade again; no drift from the models."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory

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
