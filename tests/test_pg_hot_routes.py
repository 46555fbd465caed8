"""The hot routes (GET /queue, POST /labels) through the app's own asyncio engine on PostgreSQL
(asyncpg, ``app.db.make_async_engine``), as a deployment runs them.

The API tests bind their sessions to one connection (rolled back after each test), which keeps
the threaded path; here the app owns a fresh database, so its lifespan makes the asyncio engine
and the hot routes run their transactions on the loop through it.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, func, select, text

from app import db as app_db
from app.deps import AuthCache
from app.main import create_app
from app.models import Label, Lease
from app.settings import Settings
from benchmarks.load import _populate
from tests.conftest import create_pg_database

pytestmark = pytest.mark.postgres

ANNOTATORS = 4
ITEMS = 12


@dataclass
class Served:
    client: TestClient
    app: Any
    db: Engine  # a plain engine on the served database, for the tests' own reads and locks
    project_id: int
    headers: list[dict[str, str]]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    url = create_pg_database()
    settings = Settings(environment="test", data_dir=tmp_path, database_url=url)
    args = argparse.Namespace(annotators=ANNOTATORS, items=ITEMS, overlap=2)
    project_id, tokens = _populate(settings, args)
    app = create_app(settings, migrate=False)
    db = create_engine(url)
    try:
        with TestClient(app) as client:
            assert app.state.async_sessions.kw["bind"].dialect.driver == "asyncpg"
            headers = [{"Authorization": f"Bearer {token}"} for token in tokens]
            yield Served(client, app, db, project_id, headers)
    finally:
        db.dispose()


def _count(served: Served, model: Any) -> int:
    with served.db.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(model)) or 0)


def _next(served: Served, who: int = 0) -> dict[str, Any]:
    response = served.client.get(
        "/queue", params={"project_id": served.project_id, "limit": 1}, headers=served.headers[who]
    )
    assert response.status_code == 200, response.text
    (entry,) = response.json()
    return dict(entry)


def _label(served: Served, entry: dict[str, Any], key: str, who: int = 0) -> Any:
    body = {
        "image_id": entry["image_id"],
        "lease_id": entry["lease_id"],
        "idempotency_key": key,
        "class_index": 1,
    }
    return served.client.post("/labels", json=body, headers=served.headers[who])


def test_a_cycle_and_its_replay(served: Served) -> None:
    entry = _next(served)
    assert entry["round"] == 0 and entry["rank"] == 0
    assert _next(served)["lease_id"] == entry["lease_id"]  # held: offered again, not re-leased
    first = _label(served, entry, "k1")
    assert first.status_code == 201, first.text
    again = _label(served, entry, "k1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert _count(served, Label) == 1
    assert _next(served)["rank"] == 1  # the answered item is not offered to its author again


def test_two_readers_per_image_and_no_third(served: Served) -> None:
    """overlap=2: the first item goes to two annotators, then the third gets the next one."""
    firsts = [_next(served, who) for who in range(3)]
    assert [entry["rank"] for entry in firsts] == [0, 0, 1]
    for who, entry in enumerate(firsts):
        assert _label(served, entry, f"k{who}", who).status_code == 201


def test_hot_route_errors_are_the_api_s_errors(served: Served) -> None:
    """Bad ids give 404/422 with the API's codes, never a 500, with asyncpg as with psycopg:
    ids past 32 bits (asyncpg encodes parameters itself) and past 64 bits."""
    headers = served.headers[0]
    entry = _next(served)
    for big in (2**31, 2**40, 2**63):
        queue = served.client.get("/queue", params={"project_id": big}, headers=headers)
        assert queue.status_code in (404, 422), (big, queue.text)
        for body in (
            {"image_id": big, "idempotency_key": f"i{big}", "class_index": 0},
            {"image_id": entry["image_id"], "lease_id": big, "idempotency_key": f"l{big}",
             "class_index": 0},
        ):  # fmt: skip
            label = served.client.post("/labels", json=body, headers=headers)
            assert label.status_code in (404, 422), (big, body, label.text)
    other = _label(served, entry, "theirs", who=1)  # another annotator's lease
    assert other.status_code == 403 and other.json()["error"] == "LeaseNotYours"
    bad_class = served.client.post(
        "/labels",
        json={"image_id": entry["image_id"], "lease_id": entry["lease_id"],
              "idempotency_key": "c", "class_index": 9},
        headers=headers,
    )  # fmt: skip
    assert bad_class.status_code == 422
    assert _count(served, Label) == 0  # nothing half-written


def test_concurrent_annotators_never_exceed_the_overlap(served: Served) -> None:
    """Every annotator labels until the queue is empty, all at once, through the loop's pool."""

    def annotate(who: int) -> int:
        done = 0
        while True:
            response = served.client.get(
                "/queue", params={"project_id": served.project_id, "limit": 1},
                headers=served.headers[who],
            )  # fmt: skip
            assert response.status_code == 200, response.text
            if not response.json():
                return done
            assert _label(served, response.json()[0], uuid.uuid4().hex, who).status_code == 201
            done += 1

    with ThreadPoolExecutor(ANNOTATORS) as pool:
        done = sum(pool.map(annotate, range(ANNOTATORS)))
    assert done == ITEMS * 2  # each item read twice, by two different annotators
    with served.db.connect() as conn:
        per_item = conn.execute(
            select(Lease.queue_item_id, func.count(func.distinct(Lease.user_id)))
            .where(Lease.state == "done")
            .group_by(Lease.queue_item_id)
        ).all()
    assert len(per_item) == ITEMS and {n for _, n in per_item} == {2}


def test_a_dead_pooled_connection_is_replaced_before_use(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database dropped the pool's connections (a restart, an admin): a connection idle past
    IDLE_PING_SECONDS is pinged at checkout, found dead and replaced; the request succeeds."""
    _next(served)  # the pool holds a connection now
    with served.db.connect() as conn:
        killed = conn.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert killed and killed >= 1
    monkeypatch.setattr(app_db, "IDLE_PING_SECONDS", 0.0)  # read at checkout: ping every one
    entry = _next(served)
    assert _label(served, entry, "after-restart").status_code == 201


def test_a_connection_in_use_a_moment_ago_is_not_pinged(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a connection goes back to work milliseconds after its last transaction: no
    ping round trips then (``pool_pre_ping`` pinged at every checkout); after an idle spell,
    one ping."""
    dialect = served.app.state.async_sessions.kw["bind"].sync_engine.dialect
    pings: list[object] = []
    real_ping = dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(dbapi_conn)
        return bool(real_ping(dbapi_conn))

    monkeypatch.setattr(dialect, "do_ping", counted)
    for _ in range(5):
        _next(served)  # one after the other: the same connection, back at once
    assert pings == []
    monkeypatch.setattr(app_db, "IDLE_PING_SECONDS", 0.0)
    _next(served)
    assert len(pings) == 1


def test_a_label_waits_for_its_items_lock_then_reads_the_lease_as_it_is(served: Served) -> None:
    """POST /labels locks the lease's queue item in its first statement and reads the lease in
    the next: a transaction that held the item's lock and ended the lease meanwhile is seen
    (409 LeaseNotActive), not the lease as it was before the wait."""
    entry = _next(served)
    with served.db.connect() as conn:
        conn.execute(
            text("SELECT id FROM queue_items WHERE id = :id FOR NO KEY UPDATE"),
            {"id": entry["queue_item_id"]},
        )
        conn.execute(
            text("UPDATE leases SET state = 'released' WHERE id = :id"), {"id": entry["lease_id"]}
        )
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_label, served, entry, "while-locked")
            time.sleep(0.5)
            assert not answer.done()  # waiting for the item's lock
            conn.commit()
            response = answer.result(timeout=10)
    assert response.status_code == 409 and response.json()["error"] == "LeaseNotActive"
    assert _count(served, Label) == 0


def test_a_url_with_query_parameters_keeps_psycopg(tmp_path: Path) -> None:
    """asyncpg would take a URL's query parameters (libpq's ``sslmode``, a socket ``host``...)
    as keyword arguments; such a URL keeps psycopg's asyncio connections, and works."""
    url = create_pg_database() + "?application_name=coreloop-test"
    settings = Settings(environment="test", data_dir=tmp_path, database_url=url)
    project_id, tokens = _populate(settings, argparse.Namespace(annotators=1, items=2, overlap=1))
    app = create_app(settings, migrate=False)
    with TestClient(app) as client:
        assert app.state.async_sessions.kw["bind"].dialect.driver == "psycopg"
        response = client.get(
            "/queue",
            params={"project_id": project_id, "limit": 1},
            headers={"Authorization": f"Bearer {tokens[0]}"},
        )
        assert response.status_code == 200 and len(response.json()) == 1


def test_a_token_is_resolved_on_the_loop_through_the_asyncio_engine(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token the cache misses is read through the app's asyncio engine (no worker thread, no
    psycopg); an unknown one is 401; a cached one is not read again; the read leaves no
    transaction open on its pooled connection."""

    def no_thread(*_: Any) -> None:
        raise AssertionError("the token was read in a worker thread")

    monkeypatch.setattr(AuthCache, "load", no_thread)
    reads: list[str] = []
    engine = served.app.state.async_sessions.kw["bind"].sync_engine

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        reads.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        _next(served)
        assert sum("token_hash" in s for s in reads) == 1
        _next(served)
        assert sum("token_hash" in s for s in reads) == 1  # cached
        unknown = served.client.get(
            "/queue",
            params={"project_id": served.project_id},
            headers={"Authorization": "Bearer not-a-token"},
        )
        assert unknown.status_code == 401
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with served.db.connect() as conn:
        open_ones = conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
        )
    assert open_ones == 0
