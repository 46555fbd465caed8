"""The request gate: authentication and the size limit, before a request's body is read.

FastAPI reads (and parses, and spools to disk) a body before it resolves a route's
dependencies, so without this an unauthenticated client could make the server hold or write
any amount of data before its 401. :class:`RequestGate` is a pure ASGI middleware that:

- refuses a request whose ``Content-Length`` exceeds ``max_request_bytes`` with 413
  ``PayloadTooLarge`` at once, and counts the bytes of any body as they stream in (413 when
  the count passes the limit: the rest is never read);
- checks the caller's credential when the body is first asked for, if the route (by then
  chosen: ``scope["route"]``) needs one (a dependency on :func:`app.deps.current_user`, or
  Label Studio's :func:`app.integrations.labelstudio.endpoints.ls_caller`), with the same
  checks and answers
  (401/403 envelope) as the dependency, which runs again later from the warm token cache. A
  refused request has had none of its body read.

Requests whose body is never read, and routes that need no credential, pass untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request

from app.errors import CoreloopError, PayloadTooLarge, Unauthorized, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BEARER, LABEL_STUDIO = "bearer", "label-studio"


def _auth_kind(dependant: Dependant) -> str | None:
    """Which credential a route's dependencies ask for (None: none)."""
    from app.deps import current_user
    from app.integrations.labelstudio.endpoints import ls_caller

    for dep in dependant.dependencies:
        if dep.call is current_user:
            return BEARER
        if dep.call is ls_caller:
            return LABEL_STUDIO
        found = _auth_kind(dep)
        if found is not None:
            return found
    return None


_NO_AUTH = "none"


def route_auth(scope: Scope) -> str | None:
    """The credential the request's route needs (None: none, or no route chosen yet)."""
    route = scope.get("route")
    if not isinstance(route, APIRoute):
        return None
    kinds: dict[int, str] = scope["app"].state.__dict__.setdefault("_gate_route_auth", {})
    kind = kinds.get(id(route))
    if kind is None:
        kind = kinds[id(route)] = _auth_kind(route.dependant) or _NO_AUTH
    return None if kind == _NO_AUTH else kind


async def authenticate(request: Request, kind: str) -> None:
    """The route's credential check (``CoreloopError`` when it fails)."""
    from app.deps import bearer_token, refuse_integration, user_for_token
    from app.integrations.labelstudio.endpoints import ls_caller

    if kind == BEARER:
        refuse_integration(await user_for_token(request, bearer_token(request)))
    else:
        await ls_caller(request)


async def _send_error(send: Send, exc: CoreloopError) -> None:
    body = json.dumps(error_body(exc.code, exc.detail)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the unread body is not kept on the connection
    ]
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than {limit} bytes (CORELOOP_MAX_REQUEST_BYTES)."
    )


class RequestGate:
    """Pure ASGI: see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit: int = scope["app"].state.settings.max_request_bytes
        length = dict(scope.get("headers") or []).get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > limit:
            await _send_error(send, _too_large(limit))
            return
        seen = 0
        checked = False
        refusal: CoreloopError | None = None
        replaced = False

        async def gated_receive() -> Message:
            nonlocal seen, checked, refusal
            if not checked:  # the first read of the body: the route is chosen by now
                checked = True
                kind = route_auth(scope)
                if kind is not None:
                    try:
                        await authenticate(Request(scope), kind)
                    except CoreloopError as exc:
                        refusal = exc
                        raise
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refusal = _too_large(limit)
                    raise refusal
            return message

        async def gated_send(message: Message) -> None:
            # Whatever the app makes of a refused read (FastAPI: 400 "error parsing the
            # body"), the client gets the refusal.
            nonlocal replaced
            if replaced:
                return
            if refusal is not None and message["type"] == "http.response.start":
                replaced = True
                await _send_error(send, refusal)
                return
            await send(message)

        try:
            await self.app(scope, gated_receive, gated_send)
        except CoreloopError as exc:
            if exc is not refusal or replaced:
                raise
            replaced = True
            await _send_error(send, exc)
