"""The caller's token is resolved from memory for ``AUTH_CACHE_TTL_SECONDS`` (app.deps).

A cached user is the row as read at most that long ago: a change made behind the API's back
(SQL, the CLI) shows within the TTL, a token that matches no row any more stops working within
it, and an unknown token is never cached (a new user's token works at once).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.deps import AUTH_CACHE_TTL_SECONDS, AuthCache
from app.migrate import upgrade
from app.models import Role, User
from app.security import hash_token, new_token
from app.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(app: Any) -> FakeClock:
    fake = FakeClock()
    app.state.auth_cache = AuthCache(app.state.sessions, clock=fake)
    return fake


def _me(client: TestClient, token: str) -> Any:
    return client.get("/users/me", headers={"Authorization": f"Bearer {token}"})


def test_the_ttl_is_short() -> None:
    assert 0 < AUTH_CACHE_TTL_SECONDS <= 5


def test_a_changed_row_shows_once_the_ttl_has_passed(
    client: TestClient, clock: FakeClock, db: Session, make_user: Callable[..., Any]
) -> None:
    user, token = make_user("cached", Role.annotator)
    assert _me(client, token).json()["role"] == "annotator"
    db.execute(update(User).where(User.id == user.id).values(role=Role.admin.value))
    db.commit()
    clock.now += AUTH_CACHE_TTL_SECONDS / 2
    assert _me(client, token).json()["role"] == "annotator"  # still the cached row
    clock.now += AUTH_CACHE_TTL_SECONDS
    assert _me(client, token).json()["role"] == "admin"


def test_a_token_that_matches_no_row_stops_working_within_the_ttl(
    client: TestClient, clock: FakeClock, db: Session, make_user: Callable[..., Any]
) -> None:
    user, token = make_user("replaced", Role.annotator)
    assert _me(client, token).status_code == 200
    db.execute(update(User).where(User.id == user.id).values(token_hash=hash_token(new_token())))
    db.commit()
    clock.now += AUTH_CACHE_TTL_SECONDS + 0.001
    response = _me(client, token)
    assert response.status_code == 401
    assert response.json()["error"] == "Unauthorized"


def test_an_unknown_token_is_not_cached(client: TestClient, clock: FakeClock, db: Session) -> None:
    token = new_token()
    assert _me(client, token).status_code == 401
    db.add(User(name="late", role=Role.annotator.value, token_hash=hash_token(token)))
    db.commit()
    assert _me(client, token).json()["name"] == "late"  # at once, not after the TTL


def test_each_request_gets_its_own_user_object(
    client: TestClient, app: Any, make_user: Callable[..., Any]
) -> None:
    _, token = make_user("own", Role.annotator)
    assert _me(client, token).status_code == 200
    cache: AuthCache = app.state.auth_cache
    first, second = cache.get(hash_token(token)), cache.get(hash_token(token))
    assert first is not None and second is not None and first is not second
    assert first.name == second.name == "own"


def test_a_lookup_does_not_wait_for_the_sqlite_write_lock(tmp_path: Path) -> None:
    """A cache miss reads in a deferred transaction: a writer holding the lock blocks nothing."""
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'auth.sqlite'}")
    engine = make_engine(settings)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    token = new_token()
    with unit_of_work(sessions) as session:
        session.add(User(name="reader", role=Role.annotator.value, token_hash=hash_token(token)))
    writer = sqlite3.connect(tmp_path / "auth.sqlite", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # another process's write transaction
        started = time.monotonic()
        user = AuthCache(sessions).load(hash_token(token))
        assert time.monotonic() - started < 1.0
        assert user is not None and user.name == "reader"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        engine.dispose()
