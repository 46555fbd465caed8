"""Schema management through Alembic: the only way the schema changes."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from app.errors import CoreloopError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` in one transaction."""
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


class SchemaNotCurrent(CoreloopError):
    """The database is behind (or ahead of) the migrations this code ships."""

    status_code = 503
    code = "SchemaNotCurrent"


def pending(engine: Engine) -> tuple[set[str], set[str]]:
    """(the database's revisions, the code's heads); equal when the schema is current.

    An empty first set means an empty (never upgraded) database. Reads only; changes nothing.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current, heads


def require_current(engine: Engine) -> None:
    """Raise ``SchemaNotCurrent`` unless the database is at the code's newest migration."""
    current, heads = pending(engine)
    if current != heads:
        found = ", ".join(sorted(current)) or "no coreloop schema"
        raise SchemaNotCurrent(
            f"the database schema is not current (found {found}; this code needs "
            f"{', '.join(sorted(heads))}): run `coreloop db upgrade` first"
        )
