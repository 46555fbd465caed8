"""Token lifecycle (issue 14, L5): revoke, rotate, expiry, over HTTP and the CLI; /ready says
nothing about the deployment."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.main import create_app
from app.models import Role, User, utcnow
from app.settings import get_settings
from coreloop.cli import main
from tests.conftest import new_database_url

Headers = dict[str, str]


def bearer(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def test_revoke_takes_effect_at_once(
    client: TestClient, make_user: Callable[..., tuple[User, str]], admin_headers: Headers
) -> None:
    user, token = make_user("leaver", Role.annotator)
    assert client.get("/users/me", headers=bearer(token)).status_code == 200  # now cached
    revoked = client.post(f"/users/{user.id}/revoke", headers=admin_headers)
    assert revoked.status_code == 200, revoked.text
    assert "token" not in revoked.json()
    after = client.get("/users/me", headers=bearer(token))
    assert (after.status_code, after.json()["error"]) == (401, "Unauthorized")


def test_rotate_returns_a_new_token_once_and_drops_the_old(
    client: TestClient, make_user: Callable[..., tuple[User, str]], admin_headers: Headers
) -> None:
    user, old = make_user("rotor", Role.annotator)
    assert client.get("/users/me", headers=bearer(old)).status_code == 200
    rotated = client.post(
        f"/users/{user.id}/rotate", json={"expires_in_days": 30}, headers=admin_headers
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["token"]
    assert new != old and new.startswith("cl_")
    expires = rotated.json()["token_expires_at"]
    assert expires is not None
    assert client.get("/users/me", headers=bearer(old)).status_code == 401
    me = client.get("/users/me", headers=bearer(new))
    assert (me.status_code, me.json()["token_expires_at"]) == (200, expires)
    listed = client.get("/users", headers=admin_headers).json()
    assert all("token" not in u for u in listed)
    # Without a body: a token that never expires.
    again = client.post(f"/users/{user.id}/rotate", headers=admin_headers)
    assert (again.status_code, again.json()["token_expires_at"]) == (200, None)


def test_an_expired_token_is_refused(
    client: TestClient, db: Session, make_user: Callable[..., tuple[User, str]]
) -> None:
    user, token = make_user("temp", Role.annotator)
    user.token_expires_at = utcnow() - timedelta(seconds=1)
    db.commit()
    response = client.get("/users/me", headers=bearer(token))
    assert (response.status_code, response.json()["error"]) == (401, "Unauthorized")
    assert "expired" in response.json()["detail"]


def test_create_with_an_expiry(client: TestClient, admin_headers: Headers) -> None:
    body = {"name": "visitor", "expires_in_days": 7}
    created = client.post("/users", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    assert created.json()["token_expires_at"] is not None
    bad = client.post("/users", json={"name": "v2", "expires_in_days": 0}, headers=admin_headers)
    assert bad.status_code == 422


def test_only_admins_revoke_or_rotate(
    client: TestClient,
    make_user: Callable[..., tuple[User, str]],
    annotator_headers: Headers,
    admin_headers: Headers,
) -> None:
    user, _ = make_user("target", Role.annotator)
    for action in ("revoke", "rotate"):
        response = client.post(f"/users/{user.id}/{action}", headers=annotator_headers)
        assert response.status_code == 403
        missing = client.post(f"/users/999999/{action}", headers=admin_headers)
        assert (missing.status_code, missing.json()["error"]) == (404, "UserNotFound")


def test_ready_does_not_reveal_the_database(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.json() == {"status": "ready"}
    assert "sqlite" not in response.text and "postgres" not in response.text


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_kind: str) -> Iterator[Path]:
    monkeypatch.setenv("CORELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CORELOOP_DATABASE_URL", new_database_url(db_kind, tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _token_from(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("cl_"))


def test_cli_revoke_and_rotate(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "create", "--name", "carol", "--expires-in", "2"]) == 0
    out = capsys.readouterr().out
    first = _token_from(out)
    assert "valid until" in out

    def status(token: str) -> int:
        with TestClient(create_app(get_settings())) as client:  # a fresh process's cache
            return client.get("/users/me", headers=bearer(token)).status_code

    assert status(first) == 200
    assert main(["users", "revoke", "carol"]) == 0
    captured = capsys.readouterr()
    assert "cl_" not in captured.out and "5 seconds" in captured.err
    assert status(first) == 401

    assert main(["users", "rotate", "carol", "--expires-in", "1"]) == 0
    second = _token_from(capsys.readouterr().out)
    assert (status(first), status(second)) == (401, 200)

    assert main(["users", "rotate", "nobody"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["users", "rotate", "carol", "--expires-in", "0"])
