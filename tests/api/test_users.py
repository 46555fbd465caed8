"""Users and auth: tokens, roles, and the error envelope of each refusal."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Role, User
from app.security import hash_token
from app.users.service import UserExists, create_user


def test_me_returns_the_caller(client: TestClient, annotator_headers: dict[str, str]) -> None:
    response = client.get("/users/me", headers=annotator_headers)
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "annotator"
    assert body["role"] == "annotator"
    assert "token_hash" not in body


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer not-a-real-token"},
    ],
    ids=["missing", "empty", "wrong-scheme", "unknown-token"],
)
def test_missing_or_wrong_token_is_401(
    client: TestClient, headers: dict[str, str], make_user: Callable[..., tuple[User, str]]
) -> None:
    make_user("present", Role.admin)  # users exist (every route: tests/api/test_auth_required.py)
    response = client.get("/users/me", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "Unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"


def test_admin_creates_a_user_whose_token_works(
    client: TestClient, admin_headers: dict[str, str], db: Session
) -> None:
    response = client.post(
        "/users", json={"name": "dr-who", "role": "annotator"}, headers=admin_headers
    )
    assert response.status_code == 201
    body = response.json()
    token = body["token"]
    assert body["name"] == "dr-who" and body["role"] == "annotator"
    stored = db.scalar(select(User).where(User.name == "dr-who"))
    assert stored is not None
    assert stored.token_hash == hash_token(token) != token  # only the hash is stored
    me = client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["name"] == "dr-who"


def test_annotator_cannot_create_users(
    client: TestClient, annotator_headers: dict[str, str]
) -> None:
    response = client.post("/users", json={"name": "x"}, headers=annotator_headers)
    assert response.status_code == 403
    assert response.json()["error"] == "Forbidden"
    assert client.get("/users", headers=annotator_headers).status_code == 403


def test_duplicate_name_is_409(client: TestClient, admin_headers: dict[str, str]) -> None:
    assert client.post("/users", json={"name": "twin"}, headers=admin_headers).status_code == 201
    response = client.post("/users", json={"name": " twin "}, headers=admin_headers)
    assert response.status_code == 409
    assert response.json()["error"] == "UserExists"


@pytest.mark.parametrize(
    "body", [{"name": ""}, {"name": "   "}, {"name": "x", "role": "boss"}, {"role": "admin"}]
)
def test_invalid_user_is_422(
    client: TestClient, admin_headers: dict[str, str], body: dict[str, str]
) -> None:
    response = client.post("/users", json=body, headers=admin_headers)
    assert response.status_code == 422
    assert response.json()["error"] == "ValidationError"


def test_admin_lists_users(
    client: TestClient,
    admin_headers: dict[str, str],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    make_user("reader", Role.annotator)
    names = [u["name"] for u in client.get("/users", headers=admin_headers).json()]
    assert names == ["admin", "reader"]


def test_service_refuses_a_duplicate_name(db: Session) -> None:
    user, token = create_user(db, "solo", Role.admin)
    assert user.id is not None and token.startswith("cl_")
    with pytest.raises(UserExists):
        create_user(db, "solo", "annotator")
