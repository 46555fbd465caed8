"""Engine and session factory shared by the API and the worker.

SQLite (the embedded default) is shared by two writing processes, the API and the worker.
SQLAlchemy's defaults lose updates there (pysqlite opens transactions lazily and never with
a write lock), so every transaction here starts with ``BEGIN IMMEDIATE``: one writer at a
time, readers unblocked thanks to WAL, waiting writers retried until ``busy_timeout``.
See ``shared/design/ENVIRONMENT.md`` ("SQLite shared by the API and the worker").

Within one process the writers also queue on a FIFO lock (:class:`WriterLock`) taken just
before ``BEGIN IMMEDIATE`` and released once the transaction has committed or rolled back: a
waiting thread wakes as soon as the lock is free, in arrival order. Without it every waiter
polls in SQLite's busy handler (sleeps of up to 100 ms) and some starve for seconds under load.
Writers of different processes (the worker, more API workers) meet at the database lock:
``BEGIN IMMEDIATE`` is tried again every 0.5 ms (not SQLite's busy handler, whose sleeps grow
to 100 ms), one thread per process at a time.
On PostgreSQL the API's hot paths run their transactions on the event loop through asyncpg
(:func:`make_async_engine`, :func:`unit_of_work_async`): a statement's round trip or a
row-lock wait suspends the request, not a thread.
A connection with the execution option ``read_only=True`` starts a plain (deferred) ``BEGIN``
instead: a snapshot read that neither takes nor waits for the write lock. One with
``no_wait=True`` (:data:`NO_WAIT`) waits for nothing: it raises :class:`WriterBusy` when
another thread or process holds the write lock (see :func:`try_unit_of_work_now`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine.url import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings


def normalise_url(url: str) -> str:
    """Use psycopg 3 for ``postgresql://`` URLs (the driver we install)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class WriterLock:
    """A FIFO lock for the writers of one SQLite database within this process.

    Released by whichever thread ends the transaction (a request may begin it in one worker
    thread and commit in another), so it is a hand-over lock, not an ``RLock``.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._held = False

    def acquire(self, timeout: float) -> bool:
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        if waiter.acquire(timeout=timeout):
            return True  # handed over by release()
        with self._mutex:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                return True  # handed over between the timeout and now
        return False

    def try_acquire(self) -> bool:
        """Take the lock if it is free (nobody holds it or waits for it); never waits."""
        with self._mutex:
            if self._held:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().release()  # hand over: stays held
            else:
                self._held = False


_writer_locks: dict[str, WriterLock] = {}
_writer_locks_mutex = threading.Lock()


def _writer_lock(database: str) -> WriterLock:
    """The process's lock for ``database`` (shared by every engine on that file)."""
    key = str(Path(database).resolve()) if database and database != ":memory:" else ""
    with _writer_locks_mutex:
        if not key:
            return WriterLock()  # a private in-memory database: one engine only
        return _writer_locks.setdefault(key, WriterLock())


class _WriterConnection(sqlite3.Connection):
    """A pysqlite connection that releases the writer lock when its transaction ends."""

    writer_lock: WriterLock | None = None
    holds_writer_lock = False

    def _release_writer_lock(self) -> None:
        if self.holds_writer_lock and not self.in_transaction:
            self.holds_writer_lock = False
            assert self.writer_lock is not None
            self.writer_lock.release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release_writer_lock()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release_writer_lock()

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.holds_writer_lock:
                self.holds_writer_lock = False
                assert self.writer_lock is not None
                self.writer_lock.release()


class WriterBusy(Exception):
    """SQLite: the write lock is held by another transaction, and the caller would not wait
    (for another thread of this process) or not longer than :data:`LOOP_WAIT_SECONDS` (for
    another process)."""

    def __init__(self, message: str, *, other_process: bool) -> None:
        super().__init__(message)
        self.other_process = other_process


# Execution option of a transaction begun on the event loop: take the write lock at once, or
# within LOOP_WAIT_SECONDS when another process holds it, or raise WriterBusy.
NO_WAIT = {"no_wait": True}
# Other processes' transactions on the hot path hold the lock for a few milliseconds.
LOOP_WAIT_SECONDS = 0.02

_POLL_SECONDS = 0.0005
SQLITE_POOL_SIZE = 48


def _try_begin_immediate(dbapi_conn: Any, busy_timeout_ms: int, deadline: float) -> bool:
    """``BEGIN IMMEDIATE``, tried again every 0.5 ms while another process writes, until
    ``deadline``: False if the lock was still taken then.

    SQLite's own busy handler sleeps up to 100 ms between tries, so a writer of another
    process (the worker, another API worker) would go on waiting long after the lock is free.
    """
    dbapi_conn.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_conn.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise OperationalError("BEGIN IMMEDIATE", None, exc) from exc
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)
    finally:
        dbapi_conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")


# ``Settings.sqlite_synchronous`` -> SQLite's PRAGMA value (nothing else reaches the PRAGMA).
_SYNCHRONOUS = {"normal": "NORMAL", "full": "FULL"}


def _configure_sqlite(
    engine: Engine, busy_timeout_ms: int, lock: WriterLock, synchronous: str
) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        dbapi_conn.writer_lock = lock
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("read_only"):
            conn.exec_driver_sql("BEGIN")
            return
        dbapi_conn = conn.connection.dbapi_connection
        on_loop = conn.get_execution_options().get("no_wait")
        if on_loop:
            # Never wait for a thread of this process: it may need the event loop to finish.
            if not lock.try_acquire():
                raise WriterBusy("another thread of this process writes", other_process=False)
            deadline = time.monotonic() + LOOP_WAIT_SECONDS
        else:
            deadline = time.monotonic() + busy_timeout_ms / 1000  # for both waits together
            if not lock.acquire(timeout=busy_timeout_ms / 1000):
                raise OperationalError(
                    "BEGIN IMMEDIATE",
                    None,
                    sqlite3.OperationalError("database is locked (writer queue of this process)"),
                )
        began = False
        try:
            began = _try_begin_immediate(dbapi_conn, busy_timeout_ms, deadline)
        finally:
            if not began:
                lock.release()
        if not began:
            if on_loop:
                raise WriterBusy("another process writes", other_process=True)
            raise OperationalError(
                "BEGIN IMMEDIATE", None, sqlite3.OperationalError("database is locked")
            )
        dbapi_conn.holds_writer_lock = True


def make_engine(settings: Settings) -> Engine:
    """Create the engine for ``settings.database_url`` (SQLite file dirs are created)."""
    url = normalise_url(settings.db_url)
    if url.startswith("sqlite"):
        db_path = make_url(url).database or ""
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={
                "check_same_thread": False,
                "timeout": settings.sqlite_busy_timeout_ms / 1000,
                "factory": _WriterConnection,
            },
            # Enough pooled connections for every request thread (anyio's 40) and the token
            # cache: with SQLAlchemy's default (5 + 10 overflow) busy annotators opened and
            # closed a connection (and its PRAGMAs) on most requests, or queued for one.
            pool_size=SQLITE_POOL_SIZE,
            max_overflow=SQLITE_POOL_SIZE,
        )
        _configure_sqlite(
            engine,
            settings.sqlite_busy_timeout_ms,
            _writer_lock(db_path),
            settings.sqlite_synchronous,
        )
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


# Connections of one API process's event loop (PostgreSQL), kept open: a request beyond this
# many waits for one on the loop (no thread held). No overflow: under load, overflow connections
# were opened and closed all the time, each a new PostgreSQL backend (a fork).
ASYNC_POOL_SIZE = 10
# A pooled connection is pinged at checkout only when it has been idle this long. Under load a
# connection is checked out again milliseconds after its last transaction, and a ping on each
# checkout was a round trip per transaction (three with asyncpg: BEGIN, a query, ROLLBACK). A
# connection that died within this window (a database restart) fails its request once and
# SQLAlchemy then replaces every connection that is as old (the pool's invalidation).
IDLE_PING_SECONDS = 1.0


def make_async_engine(engine: Engine) -> AsyncEngine | None:
    """PostgreSQL: an asyncio engine on ``engine``'s database, for transactions run on the event
    loop (:func:`unit_of_work_async`); None on SQLite, whose transactions on the loop need no
    driver of their own (:func:`try_unit_of_work_now`).

    The driver is asyncpg: with it, a cycle of the load benchmark (a lease, then a label) cost
    the API about a quarter less CPU than with psycopg's asyncio connections (README, Figures).
    A URL with query parameters (``sslmode``, a socket ``host``...) keeps psycopg, which reads
    them as libpq does; asyncpg would take them as keyword arguments it may not know.

    Its connections belong to the event loop that opened them: create it on the loop that will
    use it (the API's lifespan) and dispose of it there.
    """
    if engine.dialect.name != "postgresql":
        return None
    url = engine.url
    if not url.query:
        url = url.set(drivername="postgresql+asyncpg")
    async_engine = create_async_engine(url, pool_size=ASYNC_POOL_SIZE, max_overflow=0)
    _ping_after_idle(async_engine.sync_engine)
    return async_engine


def _ping_after_idle(engine: Engine) -> None:
    """Ping a connection at checkout when it sat in the pool :data:`IDLE_PING_SECONDS` or more
    (SQLAlchemy's ``pool_pre_ping`` pings at every checkout); a dead one is replaced before use."""
    pool = engine.pool

    @event.listens_for(pool, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        checked_in_at = record.info.pop("checked_in_at", None)
        if checked_in_at is None or time.monotonic() - checked_in_at < IDLE_PING_SECONDS:
            return  # a new connection, or one in use a moment ago
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            # The pool discards this connection and checks out another (documented recipe).
            raise DisconnectionError(f"the pooled connection did not answer: {exc}") from exc


def make_async_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


AfterCommit = Callable[[], None]


def ping(session: Session) -> None:
    """Ask the database a trivial question (readiness): raises if it does not answer."""
    session.execute(text("SELECT 1"))


def call_after_commit(session: Session, callback: AfterCommit) -> None:
    """Run ``callback`` once this session's transaction has committed (dropped on rollback).

    Jobs are sent this way, so a worker never sees a row that was rolled back or not yet written.
    """
    session.info.setdefault("after_commit", []).append(callback)


def commit(session: Session) -> None:
    """Commit, then run the after-commit callbacks. Only for the request/task boundary."""
    session.commit()
    run_callbacks(session.info.pop("after_commit", []))


def rollback(session: Session) -> None:
    session.info.pop("after_commit", None)
    session.rollback()


T = TypeVar("T")


def _commit_holding_callbacks(
    session: Session, work: Callable[[Session], T]
) -> tuple[T, list[AfterCommit]]:
    """``work(session)``, then the commit; returns ``work``'s result and the after-commit
    callbacks, *not run* (taken before the commit, so that it runs none of them). Rolled back,
    the callbacks dropped, if ``work`` or the commit raises."""
    try:
        result = work(session)
        callbacks: list[AfterCommit] = session.info.pop("after_commit", [])
        session.commit()
    except BaseException:
        rollback(session)
        raise
    return result, callbacks


def try_unit_of_work_now(
    factory: sessionmaker[Session], work: Callable[[Session], T]
) -> tuple[T, list[AfterCommit]]:
    """``work(session)`` and the commit, if the write lock can be had (almost) at once.

    SQLite only, for a caller that must not block long (the event loop): it takes the write
    lock as :data:`NO_WAIT` says, or raises :class:`WriterBusy` before ``work`` runs (nothing
    done). Returns ``work``'s result and the after-commit callbacks, *not run*: the caller runs
    them where blocking is allowed (they send jobs to the broker).
    """
    with factory() as session:
        session.connection(execution_options=NO_WAIT)
        return _commit_holding_callbacks(session, work)


async def unit_of_work_async(
    factory: async_sessionmaker[AsyncSession], work: Callable[[Session], T]
) -> tuple[T, list[AfterCommit]]:
    """``work(session)`` and the commit on the event loop, with an asyncio driver (PostgreSQL).

    ``work`` is the same synchronous code as anywhere else: SQLAlchemy runs it, and the commit,
    in a greenlet, and each statement's round trip (or row-lock wait) suspends only this
    request. Otherwise as :func:`try_unit_of_work_now`: rolled back if ``work`` or the commit
    raises; the after-commit callbacks are returned, not run.
    """
    async with factory() as session:
        return await session.run_sync(_commit_holding_callbacks, work)


def run_callbacks(callbacks: list[AfterCommit]) -> None:
    """Run after-commit callbacks that :func:`try_unit_of_work_now` or
    :func:`unit_of_work_async` handed back."""
    for callback in callbacks:
        callback()


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
