"""A lean HTTP/1.1 client for the load benchmark's simulated annotators.

The benchmark runs its annotators on the same machine as the server, so every CPU cycle the
client spends is taken from the server it measures. httpx, a complete client, cost about
489-560 µs of CPU per request here (``benchmarks.load --client httpx`` keeps it, for
comparison); this one, a keep-alive socket with httptools' parser (uvicorn's own, a C parser),
64-78 µs (one thread, 6,000 requests each, against a plain uvicorn app on the same machine,
2026-12-07).

It does only what the benchmark needs: one persistent connection per client, ``GET`` with query
parameters and ``POST`` with a JSON body, the same default headers on each request. It speaks
plain HTTP/1.1 to ``http://host:port`` (no TLS, no proxies, no redirects, no body delimited by
the connection's close: a response needs a length or chunks, as uvicorn's have). A response
whose connection is not kept alive closes it; the next request opens a new one. A kept-alive
connection that the server closed while it was idle (uvicorn's keep-alive timeout, 5 s) is
noticed before it is reused, as httpx does, and replaced. Any failure to send, receive or parse
closes the connection and raises :class:`TransportError` (its ``__cause__`` is the original
error); the next request reconnects. Nothing is retried: a request that failed may or may not
have reached the server.
"""

from __future__ import annotations

import json
import select
import socket
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools


class TransportError(Exception):
    """The request did not get a whole response: the connection failed, closed or timed out,
    or the response could not be parsed."""


class Response:
    """A whole response: its status and its body."""

    __slots__ = ("status_code", "content")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class _Reader:
    """httptools' callbacks for one response at a time. The status and whether the connection
    stays open are read when the headers are complete: once the message is, the parser has
    moved on to the next one."""

    def __init__(self) -> None:
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.keep_alive = False
        self.body: list[bytes] = []
        self.complete = False

    def on_message_begin(self) -> None:
        if self.complete:  # bytes after the response asked for: nothing to pair them with
            raise ValueError("the server sent more than one response")

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class Client:
    """Requests on one kept-alive connection to ``base_url`` (``http://host[:port]``).

    Used as a context manager it closes its connection at the end. Not thread-safe: one per
    annotator.
    """

    def __init__(
        self, base_url: str, headers: dict[str, str] | None = None, timeout: float = 30.0
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"an http://host[:port] URL, not {base_url!r}")
        self._address = (url.hostname, url.port or 80)
        self._timeout = timeout
        host = url.netloc
        lines = [f"Host: {host}", *(f"{name}: {value}" for name, value in (headers or {}).items())]
        self._headers = "".join(f"{line}\r\n" for line in lines).encode("latin-1")
        self._sock: socket.socket | None = None  # with self._reader.parser: both or neither
        self._reader = _Reader()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Response:
        target = f"{path}?{urlencode(params)}" if params else path
        return self._request(b"GET", target, None)

    def post(self, path: str, json: Any = None) -> Response:  # noqa: A002 (httpx's name)
        return self._request(b"POST", path, _json_bytes(json))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = self._reader.parser = None

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self) -> tuple[socket.socket, httptools.HttpResponseParser]:
        if self._sock is not None and _closed_or_readable(self._sock):
            self.close()  # closed by the server while idle (or sent what nobody asked for)
        if self._sock is None or self._reader.parser is None:
            sock = socket.create_connection(self._address, timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock, self._reader.parser = sock, httptools.HttpResponseParser(self._reader)
        return self._sock, self._reader.parser

    def _request(self, method: bytes, target: str, body: bytes | None) -> Response:
        message = [method, b" ", target.encode("ascii"), b" HTTP/1.1\r\n", self._headers]
        if body is None:
            message.append(b"\r\n")
        else:
            length = str(len(body)).encode("ascii")
            message += [b"Content-Type: application/json\r\nContent-Length: ", length]
            message += [b"\r\n\r\n", body]
        reader = self._reader
        reader.body, reader.complete = [], False
        try:
            sock, parser = self._connect()
            sock.sendall(b"".join(message))
            while not reader.complete:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the server closed the connection")
                parser.feed_data(data)
        except (OSError, httptools.HttpParserError) as exc:
            self.close()
            raise TransportError(f"{method.decode()} {target}: {exc!r}") from exc
        except BaseException:  # an upgrade, an interrupt: the connection is mid-response
            self.close()
            raise
        if not reader.keep_alive:
            self.close()
        return Response(reader.status, b"".join(reader.body))


def _closed_or_readable(sock: socket.socket) -> bool:
    """Whether an idle connection has something to read: between requests that is the server's
    close (an empty read), which the next request must not be sent into."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
