"""On PostgreSQL the hot paths' transactions run on the event loop through asyncpg's
connections (``app.deps.in_unit_of_work``, ``app.db.unit_of_work_async``): the same synchronous
service code, each statement's round trip and each row-lock wait suspending the request only.

Each test drives ``in_unit_of_work`` on a fresh PostgreSQL database with an asyncio engine made
on the test's own loop (its connections belong to that loop), as the API's lifespan does.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from anyio.from_thread import start_blocking_portal
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, object_session, sessionmaker

from app import deps
from app.db import (
    make_async_engine,
    make_async_sessionmaker,
    make_engine,
    make_sessionmaker,
    unit_of_work,
)
from app.main import create_app
from app.migrate import upgrade
from app.models import User
from app.settings import Settings
from tests.conftest import create_pg_database
from tests.test_loop_writes import Work

pytestmark = pytest.mark.postgres

T = TypeVar("T")


@pytest.fixture
def pg_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(Settings(data_dir=tmp_path, database_url=create_pg_database()))
    upgrade(engine)
    yield engine
    engine.dispose()


def _users(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(User)) or 0)


def _with_async_sessions(engine: Engine, main: Callable[[Any], Awaitable[T]]) -> T:
    """``main(request)`` on a loop of its own thread, the request's app holding the sessions of
    ``engine`` and an asyncio engine made (and disposed of) on that loop."""

    async def run() -> T:
        async_engine = make_async_engine(engine)
        assert async_engine is not None
        state = SimpleNamespace(
            sessions=make_sessionmaker(engine),
            async_sessions=make_async_sessionmaker(async_engine),
        )
        try:
            return await main(SimpleNamespace(app=SimpleNamespace(state=state)))
        finally:
            await async_engine.dispose()

    with start_blocking_portal() as portal:
        return portal.call(run)


def test_the_work_runs_on_the_loop_and_its_callbacks_in_a_thread_after_the_commit(
    pg_engine: Engine,
) -> None:
    seen_by_callback: list[int] = []

    class Counting(Work):
        def _callback(self) -> None:  # the row is committed by the time a job is sent
            seen_by_callback.append(_users(pg_engine))
            super()._callback()

    work = Counting("on-loop")

    async def main(request: Any) -> str:
        return await deps.in_unit_of_work(request, work)

    assert _with_async_sessions(pg_engine, main) == "on-loop"
    assert work.ran_on_loop is True
    assert work.callback_on_loop is False
    assert seen_by_callback == [1]
    assert _users(pg_engine) == 1


def test_work_that_raises_is_rolled_back_and_its_callbacks_dropped(pg_engine: Engine) -> None:
    work = Work("lost")

    def failing(session: Session) -> None:
        work(session)
        raise ValueError("refused")

    async def main(request: Any) -> None:
        with pytest.raises(ValueError, match="refused"):
            await deps.in_unit_of_work(request, failing)
        # The connection went back to the pool clean: the next transaction works.
        await deps.in_unit_of_work(request, Work("next"))

    _with_async_sessions(pg_engine, main)
    assert work.callback_on_loop is None  # never run
    with pg_engine.connect() as conn:
        assert conn.scalars(select(User.name)).all() == ["next"]


@contextmanager
def _row_lock_held(engine: Engine, name: str) -> Iterator[threading.Event]:
    """A user ``name``, its row locked (``FOR UPDATE``) by another connection in a thread of its
    own until the event yielded is set (or the block ends)."""
    with unit_of_work(make_sessionmaker(engine)) as session:
        session.add(User(name=name, role="annotator", token_hash=name))
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(text("SELECT id FROM users WHERE name = :name FOR UPDATE"), {"name": name})
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(10)
        yield release
    finally:
        release.set()
        thread.join()


def test_a_row_lock_wait_does_not_stall_the_loop(pg_engine: Engine) -> None:
    """A transaction waiting for a row lock held elsewhere suspends only its own request: the
    loop goes on serving others meanwhile, and the waiter goes on once the lock is released."""

    def locking(session: Session) -> str:
        session.execute(text("SELECT id FROM users WHERE name = 'contended' FOR UPDATE"))
        return "locked"

    async def main(request: Any, release: threading.Event) -> tuple[str, int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        try:
            result = await deps.in_unit_of_work(request, locking)
        finally:
            tick_task.cancel()
        return result, ticks, time.monotonic() - started

    with _row_lock_held(pg_engine, "contended") as release:
        result, ticks, waited = _with_async_sessions(
            pg_engine, lambda request: main(request, release)
        )
    assert result == "locked"
    assert waited >= 0.45  # it did wait for the lock
    assert ticks >= 20  # ...while the loop went on: 10-ms ticks through the 0.5-s wait


def _waiting_for_a_lock(engine: Engine) -> bool:
    """Whether a backend of ``engine``'s database waits for a lock (a row lock held elsewhere)."""
    with engine.connect() as conn:
        waiting = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
        )
    return bool(waiting)


def test_every_way_out_closes_the_session_and_gives_its_connection_back(
    pg_engine: Engine,
) -> None:
    """Committed, raised or cancelled while waiting for a row lock: the session is closed (no
    transaction, nothing in it) and its connection is back in the pool, not checked out."""
    sessions_seen: list[Session] = []
    loaded: list[Any] = []

    def adding(session: Session) -> str:
        sessions_seen.append(session)
        name = Work(f"user-{len(sessions_seen)}")(session)
        loaded.append(session.scalars(select(User).where(User.name == name)).one())
        return name

    def failing(session: Session) -> None:
        adding(session)
        raise ValueError("refused")

    def locking(session: Session) -> None:
        sessions_seen.append(session)
        session.execute(text("SELECT id FROM users WHERE name = 'held' FOR UPDATE"))

    async def main(request: Any) -> list[int]:
        pool = request.app.state.async_sessions.kw["bind"].sync_engine.pool
        checked_out = []
        await deps.in_unit_of_work(request, adding)
        checked_out.append(pool.checkedout())
        with pytest.raises(ValueError, match="refused"):
            await deps.in_unit_of_work(request, failing)
        checked_out.append(pool.checkedout())
        waiting = asyncio.create_task(deps.in_unit_of_work(request, locking))
        deadline = time.monotonic() + 10
        while not await asyncio.to_thread(_waiting_for_a_lock, pg_engine):
            assert time.monotonic() < deadline, "the transaction never waited for the lock"
            await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        checked_out.append(pool.checkedout())
        return checked_out

    with _row_lock_held(pg_engine, "held"):
        checked_out = _with_async_sessions(pg_engine, main)
    assert checked_out == [0, 0, 0]
    assert len(sessions_seen) == 3
    for session in sessions_seen:
        assert not session.in_transaction() and not session.identity_map
    assert len(loaded) == 2 and all(object_session(obj) is None for obj in loaded)
    with pg_engine.connect() as conn:
        assert conn.scalars(select(User.name).order_by(User.id)).all() == ["held", "user-1"]


def test_the_lifespan_makes_the_asyncio_engine_on_postgresql_only(
    pg_engine: Engine, tmp_path: Path
) -> None:
    url = pg_engine.url.render_as_string(hide_password=False)
    app = create_app(Settings(data_dir=tmp_path / "pg", database_url=url), migrate=False)
    assert not hasattr(app.state, "async_sessions")  # made on the serving loop, not before
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert app.state.async_sessions is not None
    assert not hasattr(app.state, "async_sessions")  # disposed of with the loop
    sqlite = create_app(
        Settings(data_dir=tmp_path / "lite", database_url=f"sqlite:///{tmp_path / 'l.sqlite'}")
    )
    with TestClient(sqlite):
        assert not hasattr(sqlite.state, "async_sessions")


def test_a_session_on_a_test_connection_keeps_the_threaded_path(pg_engine: Engine) -> None:
    """The API tests bind sessions to a connection (savepoints): no asyncio engine there."""
    with pg_engine.connect() as conn:
        joined = sessionmaker(bind=conn, join_transaction_mode="create_savepoint")
        work = Work("joined")

        async def main(request: Any) -> str:
            request.app.state.sessions = joined
            return await deps.in_unit_of_work(request, work)

        _with_async_sessions(pg_engine, main)
        assert work.ran_on_loop is False
