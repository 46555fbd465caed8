"""What one hot statement, and a transaction of two, cost the API's process on PostgreSQL, by
the way they are executed.

The label's first statement (``app.labels.service._TARGET``: the image, its project, the
caller's role, any label under the idempotency key) runs ``--n`` times in one transaction of an
asyncpg session, as the API's hot routes run it, three ways:

- ``core``: SQLAlchemy Core, ``conn.execute(statement, params).all()`` (how it ran before);
- ``fetch_rows``: ``app.dbapi_rows.fetch_rows`` (how it runs now);
- ``asyncpg``: the compiled SQL straight to asyncpg's ``fetch``, the floor (no processing, no
  error translation).

Then a whole transaction of two such statements, ``--n`` times, two ways:

- ``session``: as the API runs one (``app.db.unit_of_work_async``: an asyncio session, the work
  in a greenlet, ``fetch_rows`` twice, the commit; the pool's checkout and check-in);
- ``asyncpg``: ``BEGIN``, the two statements and ``COMMIT`` on one asyncpg connection, the
  floor.

It prints one JSON line: the CPU time of this process per statement and per transaction (µs,
the round trips' sends and receives included), per way, the best of ``--repeats``, and the
ratios to the first way.
The database is made (and dropped) on the test server, as ``benchmarks.load`` does.

    .venv/bin/python -m benchmarks.statement_cost
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.util import await_

from app.db import make_async_engine, make_async_sessionmaker, make_engine, unit_of_work_async
from app.dbapi_rows import fetch_rows
from app.labels.service import _TARGET
from app.models import Image, User
from app.settings import Settings
from benchmarks.load import _database_url, _populate

WAYS = ("core", "fetch_rows", "asyncpg")
TRANSACTION_WAYS = ("session", "asyncpg_transaction")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(session: Session, way: str, n: int, params: dict[str, Any]) -> float:
    """CPU seconds of this process for ``n`` executions of ``_TARGET`` the ``way`` given, all
    in the session's transaction (begun first, so the three ways run inside one alike)."""
    conn = session.connection()
    conn.exec_driver_sql("SELECT 1")  # sends BEGIN: asyncpg's own calls would not
    run: Callable[[], Any]
    if way == "core":
        run = lambda: conn.execute(_TARGET, params).all()  # noqa: E731
    elif way == "fetch_rows":
        run = lambda: fetch_rows(conn, _TARGET, params)  # noqa: E731
    else:
        state = _TARGET.compile(dialect=conn.dialect).construct_expanded_state(params)
        args = state.positional_parameters
        driver = conn.connection.driver_connection
        assert driver is not None
        run = lambda: await_(driver.fetch(state.statement, *args))  # noqa: E731
    for _ in range(min(n, 100)):  # warm: prepared statements, caches
        run()
    start = _cpu_seconds()
    for _ in range(n):
        run()
    return _cpu_seconds() - start


async def _transactions(engine: AsyncEngine, way: str, n: int, params: dict[str, Any]) -> float:
    """CPU seconds of this process for ``n`` transactions of two ``_TARGET``s."""
    driver = None
    if way == "session":
        sessions = make_async_sessionmaker(engine)

        def work(session: Session) -> None:
            fetch_rows(session.connection(), _TARGET, params)
            fetch_rows(session.connection(), _TARGET, params)

        async def one() -> None:
            await unit_of_work_async(sessions, work)

    else:
        state = _TARGET.compile(dialect=engine.dialect).construct_expanded_state(params)
        sql, args = state.statement, state.positional_parameters
        url = engine.url.set(drivername="postgresql")
        driver = connection = await asyncpg.connect(url.render_as_string(hide_password=False))

        async def one() -> None:
            async with connection.transaction():
                await connection.fetch(sql, *args)
                await connection.fetch(sql, *args)

    try:
        for _ in range(min(n, 100)):
            await one()
        start = _cpu_seconds()
        for _ in range(n):
            await one()
        return _cpu_seconds() - start
    finally:
        if driver is not None:
            await driver.close()


def measure(settings: Settings, n: int, repeats: int) -> dict[str, Any]:
    engine = make_engine(settings)
    with engine.connect() as conn:
        user_id = conn.scalar(select(func.min(User.id)))
        image_id = conn.scalar(select(func.min(Image.id)))
    params = {"image_id": image_id, "user_id": user_id, "key": "k", "lease_id": None}

    async def run() -> dict[str, float]:
        async_engine = make_async_engine(engine)
        assert async_engine is not None and async_engine.dialect.driver == "asyncpg"
        best = {way: float("inf") for way in (*WAYS, *TRANSACTION_WAYS)}
        try:
            for _ in range(repeats):
                for way in WAYS:
                    async with make_async_sessionmaker(async_engine)() as session:
                        seconds = await session.run_sync(_timed, way, n, params)
                        await session.rollback()
                    best[way] = min(best[way], seconds)
                for way in TRANSACTION_WAYS:
                    seconds = await _transactions(async_engine, way, n, params)
                    best[way] = min(best[way], seconds)
        finally:
            await async_engine.dispose()
        return best

    best = asyncio.run(run())
    engine.dispose()
    us = {way: round(1e6 * seconds / n, 1) for way, seconds in best.items()}
    per_statement = {way: us[way] for way in WAYS}
    per_transaction = {way: us[way] for way in TRANSACTION_WAYS}
    return {
        "statement": "app.labels.service._TARGET",
        "n": n,
        "repeats": repeats,
        "cpu_us_per_statement": per_statement,
        "ratio_to_core": {
            way: round(v / per_statement["core"], 3) for way, v in per_statement.items()
        },
        "cpu_us_per_transaction_of_two": per_transaction,
        "ratio_to_session": {
            way: round(v / per_transaction["session"], 3) for way, v in per_transaction.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="statements per way and repeat")
    parser.add_argument("--repeats", type=int, default=5, help="the best of these is kept")
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as directory,
        _database_url("postgresql", Path(directory)) as url,
    ):
        settings = Settings(data_dir=Path(directory), database_url=url)
        _populate(settings, argparse.Namespace(annotators=2, items=50, overlap=1))
        print(json.dumps(measure(settings, args.n, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
