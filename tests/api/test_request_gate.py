"""Authentication before the body, and the overall request-size limit (issue 14, M1).

The app is called as an ASGI app with a ``receive`` that records what was read, so a test
sees whether the server read a body before answering."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.models import Project, Role, User
from app.settings import Settings

Headers = dict[str, str]
LIMIT = 64_000


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_request_bytes": LIMIT})


def call(
    app: Any,
    method: str,
    path: str,
    headers: Headers,
    chunks: list[bytes],
    *,
    length: int | None = None,
) -> tuple[int, dict[str, Any], int]:
    """(status, JSON body, how many body chunks the server read)."""
    read = 0
    sent: list[dict[str, Any]] = []
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if length is not None:
        raw.append((b"content-length", str(length).encode()))
    else:
        raw.append((b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read < len(chunks):
            read += 1
            return {
                "type": "http.request",
                "body": chunks[read - 1],
                "more_body": read < len(chunks),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body), read


def _big_json() -> list[bytes]:
    chunk = b" " * 16_000
    return [b'{"name": "x", "classes": ["a", "b"], "pad": "', *([chunk] * 3), b'"}']


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer cl_not-a-token"}, {"Authorization": "Basic Zm9vOmJhcg=="}],
    ids=["no-token", "bad-token", "not-bearer"],
)
@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/projects", "application/json"),
        ("/labels", "application/json"),
        ("/projects/1/images", "multipart/form-data; boundary=x"),
        ("/projects/1/import?format=csv", "multipart/form-data; boundary=x"),
        ("/ls/webhook", "application/json"),
    ],
)
def test_an_unauthenticated_body_is_not_read(
    app: Any,
    make_user: Callable[..., tuple[User, str]],
    headers: Headers,
    path: str,
    content_type: str,
) -> None:
    make_user("someone", Role.admin)  # users exist: an unknown token matches none of them
    chunks = _big_json()
    status, body, read = call(
        app,
        "POST",
        path.split("?")[0],
        {**headers, "Content-Type": content_type},
        chunks,
        length=sum(map(len, chunks)),
    )
    assert (status, body["error"], read) == (401, "Unauthorized", 0)


def test_an_annotator_posting_to_an_admin_route_is_read_normally(
    app: Any, make_user: Callable[..., tuple[User, str]]
) -> None:
    """The gate checks the credential, not the role: a 403 comes from the route as before."""
    _, token = make_user("annotator-x", Role.annotator)
    chunks = [b'{"name": "p", "task": "classification", "classes": ["a", "b"]}']
    status, body, read = call(
        app,
        "POST",
        "/projects",
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        chunks,
        length=len(chunks[0]),
    )
    assert (status, body["error"]) == (403, "Forbidden")


def test_a_declared_length_over_the_limit_is_refused_unread(
    app: Any, make_user: Callable[..., tuple[User, str]]
) -> None:
    _, token = make_user("admin-x", Role.admin)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    status, body, read = call(app, "POST", "/projects", headers, [b"{}"], length=LIMIT + 1)
    assert (status, body["error"], read) == (413, "PayloadTooLarge", 0)
    # Also unauthenticated: the size is checked first, nothing is read.
    status, body, read = call(app, "POST", "/projects", {}, [b"{}"], length=10**9)
    assert (status, read) == (413, 0)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/projects", "application/json"),
        ("/labels", "application/json"),
        ("/projects/1/images", "multipart/form-data; boundary=x"),
    ],
)
def test_a_streamed_body_over_the_limit_is_cut_off(
    app: Any, make_user: Callable[..., tuple[User, str]], path: str, content_type: str
) -> None:
    _, token = make_user("admin-y", Role.admin)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    chunks = [b"x" * 20_000] * 10  # 200 kB, no Content-Length
    if content_type.startswith("multipart"):
        part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        chunks[0] = part + chunks[0][len(part) :]
    status, body, read = call(app, "POST", path, headers, chunks)
    assert (status, body["error"]) == (413, "PayloadTooLarge")
    assert read == 4  # stopped right after the limit was passed


def test_requests_within_the_limit_work(
    client: TestClient, make_project: Callable[..., Project], admin_headers: Headers
) -> None:
    body = {"name": "gate-ok", "task": "classification", "classes": ["a", "b"]}
    response = client.post("/projects", json=body, headers=admin_headers)
    assert response.status_code == 201, response.text
    assert client.get("/health").status_code == 200


def test_the_request_limit_is_at_least_the_upload_limit(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="max_request_bytes"):
        Settings(data_dir=tmp_path, max_upload_bytes=10, max_request_bytes=5)
