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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("InternalError", "An unexpected error occurred; it has been logged."), 500
        )
