"""Request-scoped dependencies: the session (the unit of work) and the caller.

The session dependency runs with ``scope="function"``: its exit code (commit, then the
after-commit callbacks such as sending a job) runs when the path function returns and
*before* the response is sent, so a client never sees a success that did not commit.

The hot paths (GET /queue, POST /labels) use :func:`in_unit_of_work` instead: the whole
transaction, from the first statement to the commit, in ONE step: on the event loop on SQLite
when the write lock is free, else in one worker thread. With ``SessionDep`` a transaction spans
several thread-pool hops (dependency, path function, response validation, dependency exit),
each a trip through the busy event loop, and on SQLite the database's write lock is held across
all of them.

The caller is resolved without the request's session (so authenticating takes no write lock)
and cached for :data:`AUTH_CACHE_TTL_SECONDS` (see :class:`AuthCache`); a miss reads on the
event loop on SQLite (a snapshot read waits for no lock) and on PostgreSQL with the app's
asyncio engine, elsewhere in a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar, cast

import anyio
from fastapi import Depends, Request
from sqlalchemy import Engine, Row, Table, bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from app.db import (
    WriterBusy,
    run_callbacks,
    try_unit_of_work_now,
    unit_of_work,
    unit_of_work_async,
)
from app.errors import Forbidden, Unauthorized
from app.models import Role, User, utcnow
from app.security import hash_token
from app.settings import Settings
from app.storage import Storage

T = TypeVar("T")


# ``async`` so that FastAPI calls them on the event loop, not through a worker thread.
async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_session(request: Request) -> Iterator[Session]:
    with unit_of_work(request.app.state.sessions) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
# At most this many requests hold a session (and so, on SQLite, the write lock) at once, per
# process. Waiting for a slot holds no worker thread, so the transaction holder always finds a
# thread to finish on: with more sessions than the thread pool's 40 threads, SQLite writers
# blocked in busy_timeout could occupy every thread while the lock holder waits for one.
MAX_CONCURRENT_SESSIONS = 16
# After another process kept the write lock past app.db.LOOP_WAIT_SECONDS, the hot paths go to
# worker threads (which wait without blocking the event loop) for this long.
LOOP_PAUSE_SECONDS = 0.1
SessionDep = Annotated[
    Session, Depends(get_session, scope="function", max_concurrency=MAX_CONCURRENT_SESSIONS)
]


def _on_an_engine(factory: sessionmaker[Session], dialect: str) -> bool:
    """Whether ``factory`` makes sessions of ``dialect`` on an engine (not a test's connection)."""
    bind = factory.kw.get("bind")
    return isinstance(bind, Engine) and bind.dialect.name == dialect


def _loop_sessions(state: Any) -> async_sessionmaker[AsyncSession] | None:
    """The app's asyncio sessions (PostgreSQL: :func:`app.db.make_async_engine`, in the
    lifespan) when its sessions are on an engine (not a test's connection); else None."""
    async_sessions: async_sessionmaker[AsyncSession] | None = getattr(state, "async_sessions", None)
    if async_sessions is not None and _on_an_engine(state.sessions, "postgresql"):
        return async_sessions
    return None


def _writes_on_the_loop(factory: sessionmaker[Session]) -> bool:
    """Whether transactions of ``factory`` may run on the event loop: SQLite, on an engine."""
    return _on_an_engine(factory, "sqlite")


async def in_unit_of_work(request: Request, work: Callable[[Session], T]) -> T:
    """``work(session)`` and the commit (then its callbacks) in one step, without a thread hop
    when it can be had.

    The request-boundary equivalent of ``SessionDep`` for ``async`` path functions: rolled
    back if ``work`` raises. On SQLite, when the write lock is free at once, the transaction
    runs right here on the event loop (:func:`app.db.try_unit_of_work_now`): SQLite takes one
    writer at a time anyway, its statements are fast local calls, and handing each transaction
    to a worker thread and back cost more CPU than the transaction (load benchmark, 1 process,
    32 annotators: 4.0-4.9 against 5.9-7.1 CPU ms per cycle; README, Figures). Only its
    after-commit callbacks (jobs sent to the broker) go to a thread. When another thread or
    process holds the lock, and on PostgreSQL without an asyncio engine (a test's connection),
    the work goes to a worker thread as one step, from its first statement to the
    commit, at most ``MAX_CONCURRENT_SESSIONS`` at once per process, so no transaction waits
    for a thread.

    PostgreSQL: when the app's lifespan made an asyncio engine (``app.state.async_sessions``,
    :func:`app.db.make_async_engine`), the transaction runs on the loop through it
    (:func:`app.db.unit_of_work_async`): each statement's round trip, or a wait for a row lock,
    suspends this request only. Through a worker thread each, about a quarter fewer cycles/s
    (load benchmark, ``--serve``, 32 annotators, 3 interleaved pairs: 158-172 against 218-221,
    with psycopg's asyncio connections then; README, Figures), the threads queuing for the GIL
    after every round trip while their transactions stayed open.
    """
    state = request.app.state
    async_sessions = _loop_sessions(state)
    if async_sessions is not None:
        result, callbacks = await unit_of_work_async(async_sessions, work)
        if callbacks:
            await anyio.to_thread.run_sync(run_callbacks, callbacks)
        return result
    if _writes_on_the_loop(state.sessions) and time.monotonic() >= getattr(
        state, "loop_writes_paused_until", 0.0
    ):
        try:
            result, callbacks = try_unit_of_work_now(state.sessions, work)
        except WriterBusy as busy:
            if busy.other_process:  # e.g. the worker writing a round: stop trying for a while
                state.loop_writes_paused_until = time.monotonic() + LOOP_PAUSE_SECONDS
        else:
            if callbacks:
                await anyio.to_thread.run_sync(run_callbacks, callbacks)
            return result
    limiter: anyio.CapacityLimiter | None = getattr(state, "unit_of_work_limiter", None)
    if limiter is None:
        limiter = state.unit_of_work_limiter = anyio.CapacityLimiter(MAX_CONCURRENT_SESSIONS)

    def run() -> T:
        with unit_of_work(state.sessions) as session:
            return work(session)

    return await anyio.to_thread.run_sync(run, limiter=limiter)


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "Send 'Authorization: Bearer <token>'; create one with `coreloop users create`."
        )
    return token.strip()


# How long a token stays resolved without asking the database. A revocation or rotation through
# this process's API clears its cache at once; one made elsewhere (the CLI, another API process,
# SQL) goes unnoticed by a running server for at most this long: 5 seconds.
AUTH_CACHE_TTL_SECONDS = 5.0
_AUTH_CACHE_MAX_ENTRIES = 10_000


_users = cast(Table, User.__table__)
_USER_BY_TOKEN_HASH = select(_users).where(_users.c.token_hash == bindparam("token_hash"))


class AuthCache:
    """Token hash -> the user's columns, for ``ttl`` seconds; unknown tokens are not cached.

    Each request gets its own detached ``User`` built from the cached columns (never one
    shared object). A miss reads the row in its own short session, read-only (on SQLite a
    deferred transaction, which neither takes nor waits for the write lock), not in the
    request's unit of work; on PostgreSQL with the app's asyncio engine, in one statement on
    the event loop (:meth:`load_async`).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        ttl: float = AUTH_CACHE_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._ttl = ttl
        self._clock = clock
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._mutex = threading.Lock()

    def get(self, token_hash: str) -> User | None:
        """The cached user, or None when unknown or older than the TTL."""
        entry = self._entries.get(token_hash)
        if entry is None or entry[0] <= self._clock():
            return None
        return User(**entry[1])

    def load(self, token_hash: str) -> User | None:
        """Read the user from the database and cache it (blocking: call it in a thread)."""
        with self._sessions() as session:
            # Read-only on an engine (see app.db); a test's session joins its connection as is.
            read_only = {"read_only": True} if isinstance(session.get_bind(), Engine) else None
            conn = session.connection(execution_options=read_only)
            row = conn.execute(_USER_BY_TOKEN_HASH, {"token_hash": token_hash}).first()
        return self._cached(token_hash, row)

    async def load_async(self, token_hash: str, engine: AsyncEngine) -> User | None:
        """:meth:`load` on the event loop through ``engine`` (PostgreSQL's asyncio engine): one
        statement in autocommit (no BEGIN, no ROLLBACK), no worker thread."""
        async with engine.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            row = (await conn.execute(_USER_BY_TOKEN_HASH, {"token_hash": token_hash})).first()
        return self._cached(token_hash, row)

    def _cached(self, token_hash: str, row: Row[Any] | None) -> User | None:
        if row is None:
            return None
        values = dict(row._mapping)
        with self._mutex:
            if len(self._entries) >= _AUTH_CACHE_MAX_ENTRIES:
                self._entries.clear()
            self._entries[token_hash] = (self._clock() + self._ttl, values)
        return User(**values)

    def clear(self) -> None:
        """Forget every cached token (after a revocation or rotation in this process)."""
        with self._mutex:
            self._entries.clear()


def auth_cache(request: Request) -> AuthCache:
    state = request.app.state
    cache: AuthCache | None = getattr(state, "auth_cache", None)
    if cache is None:
        cache = state.auth_cache = AuthCache(state.sessions)
    return cache


async def user_for_token(request: Request, token: str) -> User:
    """The user whose token this is; ``Unauthorized`` for an unknown, revoked or expired one."""
    token_hash = hash_token(token)
    cache = auth_cache(request)
    user = cache.get(token_hash)
    if user is None:
        state = request.app.state
        async_sessions = _loop_sessions(state)
        if _writes_on_the_loop(state.sessions):
            # SQLite: a snapshot read of one row by its index, which waits for no lock (WAL).
            user = cache.load(token_hash)
        elif async_sessions is not None:
            # PostgreSQL: a round trip that suspends this request only (no thread hop).
            user = await cache.load_async(token_hash, async_sessions.kw["bind"])
        else:
            user = await anyio.to_thread.run_sync(cache.load, token_hash)
    if user is None:
        raise Unauthorized("The token is not valid; ask an admin for a new one.")
    expires = user.token_expires_at
    if expires is not None and expires <= utcnow():
        raise Unauthorized(
            f"The token expired at {expires.isoformat()}; ask an admin to rotate it "
            "(`coreloop users rotate`)."
        )
    return user


def refuse_integration(user: User) -> User:
    """``user``, unless it is an integration credential (which works on /ls/* only)."""
    if user.role == Role.integration:
        raise Forbidden(
            f"User {user.name!r} is a Label Studio integration credential; it works on /ls/* only.",
            code="IntegrationOnly",
        )
    return user


async def current_user(request: Request) -> User:
    """The caller: a detached ``User`` (its columns only; not in any session)."""
    return refuse_integration(await user_for_token(request, bearer_token(request)))


CurrentUser = Annotated[User, Depends(current_user)]


async def require_admin(user: CurrentUser) -> User:
    if user.role != Role.admin:
        raise Forbidden(f"This needs the admin role; user {user.name!r} is an {user.role}.")
    return user


AdminUser = Annotated[User, Depends(require_admin)]
