"""Request-scoped dependencies: the session (the unit of work) and the caller.

The session dependency runs with ``scope="function"``: its exit code (commit, then the
after-commit callbacks such as sending a job) runs when the path function returns and
*before* the response is sent, so a client never sees a success that did not commit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import commit, rollback
from app.errors import Forbidden, Unauthorized
from app.models import Role, User
from app.security import hash_token
from app.settings import Settings
from app.storage import Storage


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_session(request: Request) -> Iterator[Session]:
    session: Session = request.app.state.sessions()
    try:
        yield session
        commit(session)
    except BaseException:
        rollback(session)
        raise
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
StorageDep = Annotated[Storage, Depends(get_storage)]
# At most this many requests hold a session (and so, on SQLite, the write lock) at once, per
# process. Waiting for a slot holds no worker thread, so the transaction holder always finds a
# thread to finish on: with more sessions than the thread pool's 40 threads, SQLite writers
# blocked in busy_timeout could occupy every thread while the lock holder waits for one.
MAX_CONCURRENT_SESSIONS = 16
SessionDep = Annotated[
    Session, Depends(get_session, scope="function", max_concurrency=MAX_CONCURRENT_SESSIONS)
]


def _bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "Send 'Authorization: Bearer <token>'; create one with `coreloop users create`."
        )
    return token.strip()


def current_user(request: Request, session: SessionDep) -> User:
    token = _bearer_token(request)
    user = session.scalar(select(User).where(User.token_hash == hash_token(token)))
    if user is None:
        raise Unauthorized("The token is not valid; ask an admin for a new one.")
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def require_admin(user: CurrentUser) -> User:
    if user.role != Role.admin:
        raise Forbidden(f"This needs the admin role; user {user.name!r} is an {user.role}.")
    return user


AdminUser = Annotated[User, Depends(require_admin)]
