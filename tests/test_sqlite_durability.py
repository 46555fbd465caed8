"""SQLite's durability setting: every connection of the engine runs in WAL mode with the
``PRAGMA synchronous`` that ``CORELOOP_SQLITE_SYNCHRONOUS`` names (NORMAL by default)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.db import make_engine
from app.settings import Settings

# SQLite's codes for PRAGMA synchronous.
NORMAL, FULL = 1, 2


def _pragmas(settings: Settings) -> list[tuple[str, int]]:
    engine = make_engine(settings)
    # Two connections at once (raw: no transaction begun): the setting holds for every
    # connection the pool opens.
    first, second = engine.raw_connection(), engine.raw_connection()
    try:
        found = []
        for raw in (first, second):
            conn = raw.driver_connection
            assert isinstance(conn, sqlite3.Connection)
            found.append(
                (
                    conn.execute("PRAGMA journal_mode").fetchone()[0],
                    conn.execute("PRAGMA synchronous").fetchone()[0],
                )
            )
        return found
    finally:
        first.close()
        second.close()
        engine.dispose()


def test_the_default_is_wal_with_synchronous_normal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CORELOOP_SQLITE_SYNCHRONOUS", raising=False)
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.sqlite_synchronous == "normal"
    assert _pragmas(settings) == [("wal", NORMAL)] * 2


def test_full_from_the_environment_sets_synchronous_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORELOOP_SQLITE_SYNCHRONOUS", "full")
    assert _pragmas(Settings(data_dir=tmp_path)) == [("wal", FULL)] * 2


def test_an_unknown_level_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORELOOP_SQLITE_SYNCHRONOUS", "off")
    with pytest.raises(ValidationError, match="sqlite_synchronous"):
        Settings(data_dir=tmp_path)
