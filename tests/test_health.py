from fastapi.testclient import TestClient


def test_health_and_ready(client: TestClient, db_kind: str) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    # Unauthenticated: it does not tell which database runs behind it (issue 14, L5).
    assert ready == {"status": "ready"}


def test_unknown_path_uses_the_error_envelope(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "NotFound"
