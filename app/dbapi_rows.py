"""The hot paths' statements, executed at the DBAPI level on asyncpg.

On PostgreSQL a cycle of the annotation loop (GET /queue, then POST /labels) runs four
statements that are built once at import (``app.queue.service``, ``app.labels.service``).
Through SQLAlchemy Core, each execution built an execution context, a cursor result and its
rows around the driver's call: ``benchmarks.statement_cost`` puts the label's first statement at
124-128 µs of the API's CPU through Core, 87-90 µs through this module and 69-72 µs through
asyncpg alone, the round trip included.
:func:`fetch_rows` compiles such a statement once per dialect and hands the SQL and its
parameters to the DBAPI cursor of the connection that the session already holds:

- the statement runs in the session's transaction (the asyncpg adapter begins it, as for any
  statement), and commits or rolls back with it;
- parameters go through the same bind processors as with Core (``construct_expanded_state``:
  expanding ``IN`` lists too), and the columns through the same result processors;
- a driver error is raised as SQLAlchemy raises it (``DBAPIError.instance``: ``DataError``,
  ``IntegrityError``...), and a lost connection is invalidated, as Core does.

On other drivers (SQLite's in-process calls cost little), it is ``conn.execute(...).all()``.
Rows are tuples whose columns are also attributes, by the names the database gives them.

What Core's execution adds and this leaves out: its execution events (``before_cursor_execute``
and the like, which SQL tracers hook into) and ``echo``'s logging do not see these statements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, cast

from sqlalchemy import Connection, Executable
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.selectable import ReturnsRows

# Compiled forms of the statements seen, per (statement, dialect). The statements are module
# constants, so this stays small; it is cleared if it ever grows past this (a caller building
# statements per call would gain nothing here anyway).
_MAX_COMPILED = 256


class Row(tuple[Any, ...]):
    """A row: a tuple, whose columns are also attributes by name (``row.label_id``)."""

    __slots__ = ()
    _index: Mapping[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        index = self._index.get(name)
        if index is None:
            raise AttributeError(
                f"the row has no column {name!r}, or more than one ({sorted(self._index)})"
            )
        return self[index]


Processor = Callable[[Any], Any]


class _Compiled:
    """A statement compiled for one dialect; per SQL it was executed as (an expanding IN list
    gives one per length), a row class and the columns' result processors (None when no column
    has one), made from the cursor's description (names and database types) at the first
    execution, as SQLAlchemy keeps a compiled statement's result metadata."""

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        self.statement = statement  # both held: the cache is keyed by their ids
        self.dialect = dialect
        self.compiled = compiled = cast(
            SQLCompiler, cast(ClauseElement, statement).compile(dialect=dialect)
        )
        # Without parameters rendered at execution (expanding IN lists), the SQL and the order
        # of its parameters are fixed: each execution then needs only its values, processed.
        self.fixed = not (compiled.post_compile_params or compiled.literal_execute_params)
        self.positions = [
            (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in compiled.positiontup or ()
        ]
        self.shapes: dict[str, tuple[type[Row], list[Processor | None] | None]] = {}

    def shape(
        self, sql: str, description: Sequence[Any]
    ) -> tuple[type[Row], list[Processor | None] | None]:
        found = self.shapes.get(sql)
        if found is None:
            names = tuple(column[0] for column in description)
            processors = None
            if isinstance(self.statement, ReturnsRows):
                columns = list(self.statement.exported_columns)
                assert len(columns) == len(names), "the cursor's columns are not the statement's"
                processors = [
                    column.type.dialect_impl(self.dialect).result_processor(self.dialect, cursor[1])
                    for column, cursor in zip(columns, description, strict=True)
                ]
            if len(self.shapes) >= _MAX_COMPILED:
                self.shapes.clear()
            found = self.shapes[sql] = (
                _row_class(names),
                processors if any(processors or ()) else None,
            )
        return found


_compiled: dict[tuple[int, int], _Compiled] = {}


def _compiled_for(statement: Executable, dialect: Dialect) -> _Compiled:
    key = (id(statement), id(dialect))
    found = _compiled.get(key)
    if found is None or found.statement is not statement or found.dialect is not dialect:
        if len(_compiled) >= _MAX_COMPILED:
            _compiled.clear()
        found = _compiled[key] = _Compiled(statement, dialect)
    return found


def fetch_rows(conn: Connection, statement: Executable, params: Mapping[str, Any]) -> Sequence[Any]:
    """All rows of ``statement`` (a constant one, built once) with ``params``, on ``conn``, in
    its transaction: at the DBAPI level on asyncpg, through Core elsewhere (SQLAlchemy's rows,
    which also have their columns as attributes)."""
    dialect = conn.dialect
    if dialect.driver != "asyncpg":
        return conn.execute(statement, dict(params)).all()
    compiled = _compiled_for(statement, dialect)
    if compiled.fixed:
        sql = compiled.compiled.string
        values: Mapping[str, Any] = compiled.compiled.construct_params(params, escape_names=False)
        positional = [
            values[name] if process is None else process(values[name])
            for name, process in compiled.positions
        ]
    else:
        state = compiled.compiled.construct_expanded_state(params)
        sql, values, bind_processors = state.statement, state.parameters, state.processors
        positional = [
            bind_processors[name](values[name]) if name in bind_processors else values[name]
            for name in state.positiontup or ()
        ]
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None  # a Connection in use holds one
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, positional)
        description = cursor.description
        raw: Sequence[Any] = cursor.fetchall() if description is not None else ()
    except Exception as error:
        _raise_as_core_does(conn, sql, positional, error, cursor)
    finally:
        cursor.close()
    if not raw:
        return []
    assert description is not None
    row_class, processors = compiled.shape(sql, description)
    if processors is None:
        return [row_class(record) for record in raw]
    return [
        row_class(
            value if process is None else process(value)
            for process, value in zip(processors, record, strict=True)
        )
        for record in raw
    ]


_row_classes: dict[tuple[str, ...], type[Row]] = {}


def _row_class(names: tuple[str, ...]) -> type[Row]:
    """The row class for columns ``names``; a name given twice is no attribute (ambiguous)."""
    row_class = _row_classes.get(names)
    if row_class is None:
        if len(_row_classes) >= _MAX_COMPILED:
            _row_classes.clear()
        once = {name for name in names if names.count(name) == 1}
        index = {name: i for i, name in enumerate(names) if name in once}
        row_class = type("Row", (Row,), {"__slots__": (), "_index": index})
        _row_classes[names] = row_class
    return row_class


def _raise_as_core_does(
    conn: Connection, sql: str, params: list[Any], error: Exception, cursor: Any
) -> NoReturn:
    """Raise ``error`` as Core would have: wrapped by ``DBAPIError.instance`` (a DBAPI error as
    its SQLAlchemy class, anything else as a ``StatementError``), the connection invalidated
    when the error says it was lost."""
    dialect = conn.dialect
    dbapi_error = dialect.loaded_dbapi.Error
    lost = isinstance(error, dbapi_error) and dialect.is_disconnect(
        error, conn.connection.dbapi_connection, cursor
    )
    if lost:
        conn.invalidate(error)
    raise DBAPIError.instance(
        sql,
        params,
        error,
        dbapi_error,
        connection_invalidated=lost,
        dialect=dialect,
    ) from error
