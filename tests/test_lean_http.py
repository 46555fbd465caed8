"""benchmarks/lean_http.py: the load benchmark's lean HTTP/1.1 client, against a real server on
a local port (the standard library's, speaking HTTP/1.1 with keep-alive)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from benchmarks.lean_http import Client, TransportError


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        pass

    def _answer(self, status: int, payload: Any, close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _record(self, body: bytes | None = None) -> None:
        self.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "port": self.client_address[1],
                "authorization": self.headers.get("Authorization"),
                "content_type": self.headers.get("Content-Type"),
                "body": body,
            }
        )

    def do_GET(self) -> None:  # noqa: N802 (the base's name)
        self._record()
        if self.path == "/close":
            self._answer(200, {"closing": True}, close=True)
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b'{"a": ', b"[1, 2, 3]", b"}"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/two":  # a second response that nobody asked for
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"
            )
        elif self.path == "/drop":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntoo short")
            self.close_connection = True
        else:
            self._answer(200, {"path": self.path})

    def do_POST(self) -> None:  # noqa: N802 (the base's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._record(body)
        self._answer(201 if self.path == "/labels" else 404, json.loads(body))


@pytest.fixture
def server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    # A kept-alive connection idle for 0.3 s is closed by the server (uvicorn's: 5 s).
    handler = type("Handler", (_Handler,), {"seen": seen, "timeout": 0.3})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_share_one_kept_alive_connection(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = server
    with Client(url, headers={"Authorization": "Bearer t0k"}) as client:
        got = client.get("/queue", params={"project_id": 3, "limit": 1})
        posted = client.post("/labels", json={"image_id": 7, "class_index": 1})
        missing = client.post("/nowhere", json={"x": None})
    assert got.status_code == 200 and got.json() == {"path": "/queue?project_id=3&limit=1"}
    assert posted.status_code == 201 and posted.json() == {"image_id": 7, "class_index": 1}
    assert missing.status_code == 404 and missing.json() == {"x": None}
    assert [r["method"] for r in seen] == ["GET", "POST", "POST"]
    assert {r["authorization"] for r in seen} == {"Bearer t0k"}
    assert seen[1]["content_type"] == "application/json"
    assert json.loads(seen[1]["body"]) == {"image_id": 7, "class_index": 1}
    assert len({r["port"] for r in seen}) == 1  # one connection for the three


def test_a_closing_response_is_read_and_the_next_request_reconnects(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = server
    with Client(url) as client:
        assert client.get("/close").json() == {"closing": True}
        assert client.get("/after").json() == {"path": "/after"}
    assert seen[0]["port"] != seen[1]["port"]


def test_a_connection_the_server_closed_while_idle_is_replaced_before_use(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = server
    with Client(url) as client:
        assert client.get("/first").status_code == 200
        time.sleep(0.6)  # past the server's keep-alive timeout: it closes the connection
        assert client.post("/labels", json={"n": 1}).json() == {"n": 1}
    assert [r["path"] for r in seen] == ["/first", "/labels"]  # sent once, not retried
    assert seen[0]["port"] != seen[1]["port"]


def test_bytes_after_the_response_close_the_connection(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    """Never taken for the next request's response: refused with the response they came with
    (read together), or noticed on the idle connection before the next request."""
    url, _ = server
    with Client(url) as client:
        try:
            response = client.get("/two")
        except TransportError:
            pass
        else:
            assert (response.status_code, response.content) == (200, b"ok")
        assert client.get("/fine").json() == {"path": "/fine"}


def test_a_chunked_body_is_joined(server: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = server
    with Client(url) as client:
        assert client.get("/chunked").json() == {"a": [1, 2, 3]}
        assert client.get("/again").status_code == 200


def test_a_cut_response_raises_and_the_client_recovers(
    server: tuple[str, list[dict[str, Any]]],
) -> None:
    url, _ = server
    with Client(url) as client:
        with pytest.raises(TransportError) as raised:
            client.get("/drop")
        assert isinstance(raised.value.__cause__, ConnectionResetError)
        assert client.get("/fine").json() == {"path": "/fine"}


def test_no_server_raises_a_transport_error() -> None:
    with socket.socket() as bound:  # a port of ours that nobody listens on: refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        with Client(url, timeout=5.0) as client, pytest.raises(TransportError) as raised:
            client.get("/queue")
    assert isinstance(raised.value.__cause__, OSError)


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="http://host"):
        Client("https://127.0.0.1:8000")
    with pytest.raises(ValueError, match="http://host"):
        Client("127.0.0.1:8000")
