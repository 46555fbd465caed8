"""HTTP details every response gets, as a pure ASGI middleware (outermost of the app's own).

- ``HEAD`` works wherever ``GET`` does: FastAPI routes answer only the methods they declare,
  so a ``HEAD`` was 405. The request is routed as a ``GET`` and the body is dropped; the status
  and headers (``Content-Length`` included) are the ``GET``'s.
- ``X-Content-Type-Options: nosniff`` on every response, so that a browser never reads a stored
  file (an image, a mask) or a JSON body as another type than the one declared.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

NOSNIFF = (b"x-content-type-options", b"nosniff")


class ResponseBasics:
    """Pure ASGI: see the module's docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}

        async def send_basics(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != NOSNIFF[0]]
                message = {**message, "headers": [*headers, NOSNIFF]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}  # more_body as sent: the GET runs to its end
            await send(message)

        await self.app(scope, receive, send_basics)
