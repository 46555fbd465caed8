"""Domain errors and the one error envelope: ``{"error": "<CodeName>", "detail": "..."}``.

Services raise these (never ``HTTPException``); ``install_error_handlers`` renders them, and
renders FastAPI's own 404/405/422 in the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class CoreloopError(Exception):
    """Base of every error a client can cause; ``code`` is the envelope's ``error``."""

    status_code: int = 400
    code: str = "BadRequest"

    def __init__(self, detail: str, *, code: str | None = None, status_code: int | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code


class NotFound(CoreloopError):
    status_code = 404
    code = "NotFound"


class Conflict(CoreloopError):
    status_code = 409
    code = "Conflict"


class InvalidInput(CoreloopError):
    status_code = 422
    code = "InvalidInput"


class Unauthorized(CoreloopError):
    status_code = 401
    code = "Unauthorized"


class Forbidden(CoreloopError):
    status_code = 403
    code = "Forbidden"


class PayloadTooLarge(CoreloopError):
    status_code = 413
    code = "PayloadTooLarge"


def error_body(code: str, detail: Any) -> dict[str, Any]:
    return {"error": code, "detail": detail}


# Ids and counts are 64-bit integers in both databases. An integer past that range in a path,
# query or body reaches the driver as it came (validating every int field of every route would
# be easy to forget on the next one), which refuses it: sqlite3 raises OverflowError while
# binding it, PostgreSQL "bigint out of range". Both mean the client sent a number that
# cannot exist here: 422, never 500. The transaction has been rolled back by then.
NUMBER_OUT_OF_RANGE = (
    "A number in the request is out of range: ids and counts are 64-bit integers "
    f"({-(2**63)} to {2**63 - 1})."
)


def _is_sqlite_overflow(exc: BaseException | None) -> bool:
    return isinstance(exc, OverflowError) and "SQLite INTEGER" in str(exc)


_NUMERIC_VALUE_OUT_OF_RANGE = "22003"  # PostgreSQL's SQLSTATE


def _asyncpg_overflow(exc: BaseException | None) -> bool:
    """asyncpg refusing an integer parameter past its column type before sending it: its
    ``DataError`` caused by an ``OverflowError`` ("value out of int32 range")."""
    while exc is not None:
        if isinstance(exc, OverflowError) and "out of int" in str(exc):
            return True
        exc = exc.__cause__
    return False


def is_number_out_of_range(exc: BaseException) -> bool:
    """Whether ``exc`` is the database or its driver refusing an integer outside its type's
    range (the server: psycopg and asyncpg; or asyncpg itself, before sending it)."""
    if _is_sqlite_overflow(exc):
        return True
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        return (
            _is_sqlite_overflow(orig)
            or getattr(orig, "sqlstate", None) == _NUMERIC_VALUE_OUT_OF_RANGE
            or _asyncpg_overflow(orig)
        )
    return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CoreloopError)
    async def _domain(_: Request, exc: CoreloopError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return JSONResponse(error_body(exc.code, exc.detail), exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(error_body("ValidationError", errors), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: "NotFound", 405: "MethodNotAllowed", 401: "Unauthorized", 403: "Forbidden"}
        code = names.get(exc.status_code, f"HTTP{exc.status_code}")
        return JSONResponse(error_body(code, exc.detail), exc.status_code, headers=exc.headers)

    async def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
        if is_number_out_of_range(exc):
            return JSONResponse(error_body("NumberOutOfRange", NUMBER_OUT_OF_RANGE), 422)
        raise exc  # any other: unhandled, as before (logged, 500)

    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DBAPIError, _out_of_range)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("InternalError", "An unexpected error occurred; it has been logged."),
            500,
            headers={"X-Content-Type-Options": "nosniff"},  # outside app.middleware's reach
        )
