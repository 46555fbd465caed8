"""``app.dbapi_rows.fetch_rows``: the hot statements at the DBAPI level on asyncpg, giving what Core
gives (values, types, errors) in the session's own transaction."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from anyio.from_thread import start_blocking_portal
from sqlalchemy import Engine, create_engine, func, literal, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from app.db import make_async_engine, make_async_sessionmaker, make_engine
from app.dbapi_rows import _row_class, fetch_rows
from app.labels.service import _TARGET
from app.models import Image, Lease, QueueItem, User, utcnow
from app.queue.service import _CANDIDATES, _LEASE_IF_STILL_FREE, _PROJECT_HELD_AND_CANDIDATES
from app.settings import Settings
from benchmarks.load import _populate
from tests.conftest import create_pg_database

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[tuple[Engine, int]]:
    """A PostgreSQL database with the load benchmark's project (2 annotators, 6 items)."""
    settings = Settings(data_dir=tmp_path, database_url=create_pg_database())
    args = argparse.Namespace(annotators=2, items=6, overlap=1)
    project_id, _ = _populate(settings, args)
    engine = make_engine(settings)
    yield engine, project_id
    engine.dispose()


def _on_asyncpg(engine: Engine, work: Callable[[Session], T], commit: bool = False) -> T:
    """``work(session)`` in a transaction of an asyncpg session (as the API's hot routes run),
    then rolled back (or committed)."""

    async def run() -> T:
        async_engine = make_async_engine(engine)
        assert async_engine is not None and async_engine.dialect.driver == "asyncpg"
        try:
            async with make_async_sessionmaker(async_engine)() as session:
                result = await session.run_sync(work)
                await (session.commit() if commit else session.rollback())
                return result
        finally:
            await async_engine.dispose()

    # On a loop of its own thread: once a browser test has run, pytest-playwright's sync
    # Playwright (session-wide) leaves its loop as this thread's running loop.
    with start_blocking_portal() as portal:
        return portal.call(run)


def _annotator(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(select(func.min(User.id))) or 0)


def _params(engine: Engine, project_id: int) -> dict[str, Any]:
    return {"project_id": project_id, "user_id": _annotator(engine), "now": utcnow()}


def _lease_params(session: Session, params: dict[str, Any], n: int) -> dict[str, Any]:
    item_ids = list(session.scalars(select(QueueItem.id).order_by(QueueItem.id)))
    expires_at = params["now"] + timedelta(minutes=10)
    return {**params, "item_ids": item_ids, "n": n, "expires_at": expires_at}


@pytest.mark.postgres
def test_rows_are_core_s_rows(populated: tuple[Engine, int]) -> None:
    """Inserted leases (RETURNING), the queue's first statement with them held (timestamps,
    NULLs, a union), a later pass's candidates (an expanding IN list) and a label's target (JSON,
    labelled columns): the same values, of the same types, as Core's rows, by index and name."""
    engine, project_id = populated
    params = _params(engine, project_id)

    def work(session: Session) -> list[tuple[Any, Any]]:
        conn = session.connection()
        leased = fetch_rows(conn, _LEASE_IF_STILL_FREE, _lease_params(session, params, 2))
        assert len(leased) == 2 and {row.id for row in leased} == set(
            session.scalars(select(Lease.id))
        )
        image_id = session.scalar(select(func.min(Image.id)))
        pairs = [
            (_PROJECT_HELD_AND_CANDIDATES, {**params, "limit": 4}),
            (_CANDIDATES, {**params, "n": 3, "seen": [leased[0].queue_item_id]}),
            (_TARGET, {"image_id": image_id, "user_id": params["user_id"], "key": "k",
                       "lease_id": leased[0].id}),
        ]  # fmt: skip
        return [
            (fetch_rows(conn, statement, values), conn.execute(statement, values).all())
            for statement, values in pairs
        ]

    first, candidates, target = _on_asyncpg(engine, work)
    for ours, core in (first, candidates, target):
        assert ours and [tuple(row) for row in ours] == [tuple(row) for row in core]
        for mine, theirs in zip(ours, core, strict=True):
            assert [type(value) for value in mine] == [type(value) for value in theirs]
    held = [row for row in first[0] if row[3] is not None]  # the lease's id and expires_at
    assert len(held) == 2 and all(row[4].utcoffset() == timedelta(0) for row in held)
    (ours_target,) = target[0]
    assert ours_target.classes == ["benign", "malignant"] and ours_target.member_role is not None
    assert ours_target.label_under_key is None and ours_target.locked_item is not None


@pytest.mark.postgres
def test_the_statement_runs_in_the_session_s_transaction(populated: tuple[Engine, int]) -> None:
    """As the transaction's first statement (the adapter begins it), rolled back with it, and
    committed with it."""
    engine, project_id = populated
    params = _params(engine, project_id)

    def lease(session: Session) -> int:
        rows = fetch_rows(
            session.connection(), _LEASE_IF_STILL_FREE, _lease_params(session, params, 1)
        )
        return len(rows)

    def leases() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(Lease)) or 0)

    assert _on_asyncpg(engine, lease) == 1
    assert leases() == 0  # rolled back
    assert _on_asyncpg(engine, lease, commit=True) == 1
    assert leases() == 1


@pytest.mark.postgres
def test_errors_are_raised_as_core_raises_them(populated: tuple[Engine, int]) -> None:
    """A value out of range and a foreign key violation: the same SQLAlchemy classes as Core's,
    with the driver's error as ``orig``, and the session rolls back and goes on."""
    engine, project_id = populated
    params = _params(engine, project_id)
    too_big = {"image_id": 2**31, "user_id": 1, "key": "k", "lease_id": None}

    def nobody(session: Session) -> dict[str, Any]:  # a lease for a user who does not exist
        return {**_lease_params(session, params, 1), "user_id": 10**6}

    def raised(run: Callable[[Session], Any]) -> BaseException:
        def work(session: Session) -> BaseException:
            with pytest.raises(DBAPIError) as caught:
                run(session)
            return caught.value

        return _on_asyncpg(engine, work)

    for via_core, ours in (
        (
            raised(lambda s: s.connection().execute(_TARGET, too_big).all()),
            raised(lambda s: fetch_rows(s.connection(), _TARGET, too_big)),
        ),
        (
            raised(lambda s: s.connection().execute(_LEASE_IF_STILL_FREE, nobody(s)).all()),
            raised(lambda s: fetch_rows(s.connection(), _LEASE_IF_STILL_FREE, nobody(s))),
        ),
    ):  # fmt: skip
        assert type(ours) is type(via_core)
        assert type(ours.orig) is type(via_core.orig)  # type: ignore[attr-defined]
    assert isinstance(ours, IntegrityError)
    assert _on_asyncpg(engine, lambda s: fetch_rows(s.connection(), select(literal(1)), {})) == [
        (1,)
    ]


@pytest.mark.postgres
def test_a_lost_connection_is_invalidated(populated: tuple[Engine, int]) -> None:
    """A connection whose server process ended: the error says it was invalidated, as Core's
    does, and the pool replaces it."""
    engine, _ = populated
    admin = create_engine(engine.url)

    def work(session: Session) -> DBAPIError:
        conn = session.connection()
        (pid,) = fetch_rows(conn, select(func.pg_backend_pid()), {})[0]
        with admin.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as caught:
            fetch_rows(conn, select(literal(1)), {})
        assert conn.invalidated
        return caught.value

    try:
        error = _on_asyncpg(engine, work)
    finally:
        admin.dispose()
    assert error.connection_invalidated


def test_rows_have_their_columns_as_attributes() -> None:
    """By name, by index and by slice; a name given twice is no attribute. Elsewhere than on
    asyncpg, Core's own rows."""
    row = _row_class(("id", "id", "label_id"))((1, 2, 3))
    assert row.label_id == 3 and row[1] == 2 and row[:2] == (1, 2)
    with pytest.raises(AttributeError, match="'id'"):
        _ = row.id
    engine = create_engine("sqlite://")
    with engine.connect() as conn:
        (only,) = fetch_rows(conn, select(literal(7).label("seven")), {})
    assert only.seven == 7 and type(only).__module__.startswith("sqlalchemy")


@pytest.mark.postgres
def test_the_statement_cost_benchmark_runs() -> None:
    """``benchmarks.statement_cost``, tiny: one JSON line with the three ways' CPU per
    statement, the two ways' per transaction, and their ratios."""
    from benchmarks.statement_cost import TRANSACTION_WAYS, WAYS

    cmd = [sys.executable, "-m", "benchmarks.statement_cost", "--n", "20", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report["cpu_us_per_statement"]) == set(WAYS)
    assert all(us > 0 for us in report["cpu_us_per_statement"].values())
    assert report["ratio_to_core"]["core"] == 1.0
    assert set(report["cpu_us_per_transaction_of_two"]) == set(TRANSACTION_WAYS)
    assert all(us > 0 for us in report["cpu_us_per_transaction_of_two"].values())
