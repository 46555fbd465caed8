"""The hot paths' transactions on SQLite run on the event loop when the write lock is free
(``app.deps.in_unit_of_work``, ``app.db.try_unit_of_work_now``), and go to a worker thread,
which waits without blocking the loop, when another thread or process holds it.

Each test drives ``in_unit_of_work`` on a real SQLite file through a minimal request, and
records where the work ran: on the loop (``asyncio.get_running_loop()`` answers) or in a thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from anyio.from_thread import start_blocking_portal
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import State

from app import deps
from app.db import (
    LOOP_WAIT_SECONDS,
    WriterBusy,
    call_after_commit,
    make_engine,
    make_sessionmaker,
    try_unit_of_work_now,
    unit_of_work,
)
from app.migrate import upgrade
from app.models import User
from app.security import hash_token
from app.settings import Settings

T = TypeVar("T")


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[tuple[Engine, Path]]:
    path = tmp_path / "loop.sqlite"
    engine = make_engine(Settings(data_dir=tmp_path, database_url=f"sqlite:///{path}"))
    upgrade(engine)
    yield engine, path
    engine.dispose()


def _request(sessions: sessionmaker[Session]) -> Any:
    return SimpleNamespace(app=SimpleNamespace(state=State({"sessions": sessions})))


def _on_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Work:
    """Adds a user and an after-commit callback; records where each ran."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ran_on_loop: bool | None = None
        self.callback_on_loop: bool | None = None

    def __call__(self, session: Session) -> str:
        self.ran_on_loop = _on_loop()
        session.add(User(name=self.name, role="annotator", token_hash=self.name))
        session.flush()
        call_after_commit(session, self._callback)
        return self.name

    def _callback(self) -> None:
        self.callback_on_loop = _on_loop()


def _users(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(User)) or 0)


def _on_a_loop(main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` on an event loop of its own thread (not the test's, where an earlier test
    may have left a loop marked running)."""
    with start_blocking_portal() as portal:
        return portal.call(main)


def _run(request: Any, work: Work) -> str:
    async def main() -> str:
        return await deps.in_unit_of_work(request, work)

    return _on_a_loop(main)


def test_a_free_lock_runs_the_work_on_the_loop_and_the_callbacks_in_a_thread(
    sqlite_file: tuple[Engine, Path],
) -> None:
    engine, _ = sqlite_file
    work = Work("on-loop")
    assert _run(_request(make_sessionmaker(engine)), work) == "on-loop"
    assert work.ran_on_loop is True
    assert work.callback_on_loop is False  # jobs are sent where blocking is allowed
    assert _users(engine) == 1


def test_a_thread_of_this_process_holding_the_lock_sends_the_work_to_a_thread(
    sqlite_file: tuple[Engine, Path],
) -> None:
    """The loop never waits for a thread of its own process (that thread may need the loop)."""
    engine, _ = sqlite_file
    sessions = make_sessionmaker(engine)
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with unit_of_work(sessions) as session:
            session.add(User(name="holder", role="annotator", token_hash="holder"))
            session.flush()  # BEGIN IMMEDIATE: this process's writer lock and the database's
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(10)
        threading.Timer(0.3, release.set).start()
        work = Work("waited")
        started = time.monotonic()
        assert _run(_request(sessions), work) == "waited"
        assert time.monotonic() - started >= 0.25  # it waited for the holder's commit
        assert work.ran_on_loop is False
    finally:
        release.set()
        thread.join()
    assert _users(engine) == 2


def test_another_process_holding_the_lock_pauses_loop_writes_for_a_while(
    sqlite_file: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, path = sqlite_file
    monkeypatch.setattr(deps, "LOOP_PAUSE_SECONDS", 0.5)
    request = _request(make_sessionmaker(engine))
    # A connection outside this process's writer lock: another process, as far as it knows.
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
        first = Work("first")
        assert _run(request, first) == "first"
        assert first.ran_on_loop is False  # waited LOOP_WAIT_SECONDS on the loop, then a thread
        paused_until = request.app.state.loop_writes_paused_until
        assert paused_until > time.monotonic()
        second = Work("second")
        _run(request, second)
        assert second.ran_on_loop is False  # still paused: straight to a thread
        time.sleep(max(0.0, paused_until - time.monotonic()) + 0.01)
        third = Work("third")
        _run(request, third)
        assert third.ran_on_loop is True
    finally:
        other.close()
    assert _users(engine) == 3


def test_the_loop_waits_at_most_loop_wait_seconds_for_another_process(
    sqlite_file: tuple[Engine, Path],
) -> None:
    engine, path = sqlite_file
    other = sqlite3.connect(path, isolation_level=None)
    ran: list[bool] = []
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(WriterBusy) as busy:
            try_unit_of_work_now(make_sessionmaker(engine), lambda s: ran.append(True))
        waited = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert busy.value.other_process
    assert LOOP_WAIT_SECONDS <= waited < LOOP_WAIT_SECONDS + 0.5
    assert ran == []  # nothing ran: the work never began
    # The lock was given back: a write now goes through at once.
    work = Work("after")
    result, callbacks = try_unit_of_work_now(make_sessionmaker(engine), work)
    assert result == "after" and len(callbacks) == 1 and work.callback_on_loop is None


def test_work_that_raises_on_the_loop_is_rolled_back_and_frees_the_lock(
    sqlite_file: tuple[Engine, Path],
) -> None:
    engine, _ = sqlite_file
    request = _request(make_sessionmaker(engine))

    def failing(session: Session) -> None:
        session.add(User(name="lost", role="annotator", token_hash="lost"))
        session.flush()
        raise ValueError("refused")

    async def main() -> None:
        await deps.in_unit_of_work(request, failing)

    with pytest.raises(ValueError, match="refused"):
        _on_a_loop(main)
    assert _users(engine) == 0
    work = Work("next")
    _run(request, work)
    assert work.ran_on_loop is True  # the lock is free again, so the next one runs on the loop
    assert _users(engine) == 1


def test_a_session_on_a_test_connection_always_uses_a_thread(
    sqlite_file: tuple[Engine, Path],
) -> None:
    """Sessions bound to a connection (the API tests' savepoints) keep the threaded path."""
    engine, _ = sqlite_file
    with engine.connect() as conn:
        sessions = sessionmaker(bind=conn, join_transaction_mode="create_savepoint")
        work = Work("joined")
        _run(_request(sessions), work)
        assert work.ran_on_loop is False


def test_a_token_cache_miss_reads_on_the_loop_on_sqlite(
    sqlite_file: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss is a snapshot read of one row, which waits for no lock in WAL mode: no thread hop,
    even while another process holds the write lock."""
    engine, path = sqlite_file
    sessions = make_sessionmaker(engine)
    with unit_of_work(sessions) as session:
        session.add(User(name="reader", role="annotator", token_hash=hash_token("cl_tok")))
    loads: list[bool] = []
    load = deps.AuthCache.load

    def recording(self: deps.AuthCache, token_hash: str) -> User | None:
        loads.append(_on_loop())
        return load(self, token_hash)

    monkeypatch.setattr(deps.AuthCache, "load", recording)
    request = _request(sessions)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")

        async def main() -> User:
            return await deps.user_for_token(request, "cl_tok")

        assert _on_a_loop(main).name == "reader"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert loads == [True]
