"""Engine and session factory shared by the API and the worker.

SQLite (the embedded default) is shared by two writing processes, the API and the worker.
SQLAlchemy's defaults lose updates there (pysqlite opens transactions lazily and never with
a write lock), so every transaction here starts with ``BEGIN IMMEDIATE``: one writer at a
time, readers unblocked thanks to WAL, waiting writers retried by ``busy_timeout``.
See ``shared/design/ENVIRONMENT.md`` ("SQLite shared by the API and the worker").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (the driver we install)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(settings: Settings) -> Engine:
    """Create the engine for ``settings.database_url`` (SQLite file dirs are created)."""
    url = normalise_url(settings.db_url)
    if url.startswith("sqlite"):
        db_path = make_url(url).database
        if db_path and db_path != ":memory:":
            from pathlib import Path

            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": settings.sqlite_busy_timeout_ms / 1000,
            },
        )
        _configure_sqlite(engine, settings.sqlite_busy_timeout_ms)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


AfterCommit = Callable[[], None]


def call_after_commit(session: Session, callback: AfterCommit) -> None:
    """Run ``callback`` once this session's transaction has committed (dropped on rollback).

    Jobs are sent this way, so a worker never sees a row that was rolled back or not yet written.
    """
    session.info.setdefault("after_commit", []).append(callback)


def commit(session: Session) -> None:
    """Commit, then run the after-commit callbacks. Only for the request/task boundary."""
    session.commit()
    callbacks: list[AfterCommit] = session.info.pop("after_commit", [])
    for callback in callbacks:
        callback()


def rollback(session: Session) -> None:
    session.info.pop("after_commit", None)
    session.rollback()


@contextmanager
def unit_of_work(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction for a task or a script: commit on success, roll back on error.

    The only place besides the request boundary (``app.deps``) where code commits.
    """
    session = factory()
    try:
        yield session
        commit(session)
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()
