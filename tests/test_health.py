import gc
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


def test_health_and_ready(client: TestClient, db_kind: str) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    # Unauthenticated: it does not tell which database runs behind it (issue 14, L5).
    assert ready == {"status": "ready"}


def test_unknown_path_uses_the_error_envelope(client: TestClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert response.json()["error"] == "NotFound"


def test_start_up_freezes_the_objects_alive_then(tmp_path: Path) -> None:
    """``gc_freeze`` (the default outside the tests): once started, the app's modules and
    schema are out of the garbage collector's sight, so full collections stay short."""
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'gc.sqlite'}", gc_freeze=True
    )
    gc.unfreeze()
    try:
        with TestClient(create_app(settings)) as client:
            assert client.get("/health").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()
