"""Every route that needs a credential refuses a missing or wrong one, with users present
(issue 14): if the token lookup ever fell back to some user, these would fail. The routes
come from the app itself; a new route is covered, or must be listed as public here."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models import Role, User
from app.settings import Settings

PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/ls/health"),
    ("GET", "/ls/projects/{project_id}/health"),
}


def _operations() -> list[tuple[str, str]]:
    where = Path(tempfile.gettempdir()) / "coreloop-auth-routes"
    schema = create_app(Settings(environment="test", data_dir=where), migrate=False).openapi()
    return sorted(
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if (method.upper(), path) not in PUBLIC
    )


OPERATIONS = _operations()


def _concrete(path: str) -> str:
    """The path with every parameter filled in (an id that exists: 1)."""
    parts = [("1" if p.startswith("{") else p) for p in path.split("/")]
    return "/".join(parts).replace("/activelearning/1", "/activelearning/random")


def _basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"coreloop:{token}".encode()).decode()}


@pytest.fixture
def tokens(make_user: Callable[..., tuple[User, str]]) -> dict[Role, str]:
    """Users of every role exist (and user 1 is one of them)."""
    return {role: make_user(f"present-{role}", role)[1] for role in Role}


def _wrong(tokens: dict[Role, str]) -> list[dict[str, str]]:
    real = tokens[Role.admin]
    almost = real[:-1] + ("A" if real[-1] != "A" else "B")
    return [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer cl_not-a-token"},
        {"Authorization": f"Bearer {almost}"},
        {"Authorization": f"Token {real}"},
        {"Authorization": real},
        _basic("cl_not-a-token"),
    ]


def test_the_operations_are_all_there() -> None:
    paths = {path for _, path in OPERATIONS}
    families = {path.split("/")[1] for path in paths}
    assert families >= {
        "users",
        "projects",
        "images",
        "queue",
        "leases",
        "labels",
        "rounds",
        "models",
        "export",
        "activelearning",
        "ls",
        "predictions",
    }
    assert len(OPERATIONS) >= 40


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_a_missing_or_wrong_credential_is_401(
    client: TestClient, tokens: dict[Role, str], method: str, path: str
) -> None:
    url = _concrete(path)
    body: dict[str, Any] = {"json": {}} if method in ("POST", "PATCH") else {}
    for headers in _wrong(tokens):
        response = client.request(method, url, headers=headers, **body)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"] == "Unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path"),
    [op for op in OPERATIONS if not op[1].startswith("/ls/")],
    ids=[f"{m} {p}" for m, p in OPERATIONS if not p.startswith("/ls/")],
)
def test_an_integration_credential_works_on_ls_only(
    client: TestClient, tokens: dict[Role, str], method: str, path: str
) -> None:
    body: dict[str, Any] = {"json": {}} if method in ("POST", "PATCH") else {}
    headers = {"Authorization": f"Bearer {tokens[Role.integration]}"}
    response = client.request(method, _concrete(path), headers=headers, **body)
    assert (response.status_code, response.json()["error"]) == (403, "IntegrationOnly")
