"""Browser tests of the annotator page: a real server, real headless Chromium.

Each test gets its own API server (uvicorn in a thread on 127.0.0.1, a free port, a fresh
SQLite file migrated at start-up) and seeds its rows directly in that database, as the worker
would leave them. Chromium is Debian's (``/usr/lib/chromium/chromium``): Playwright never
downloads a browser here, and the page may not resolve any host name (it needs none).
"""

from __future__ import annotations

import io
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image as PILImage
from playwright.sync_api import Page
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.main import create_app
from app.models import (
    Image,
    ModelVersion,
    Prediction,
    Project,
    QueueItem,
    Role,
    Round,
    User,
    utcnow,
)
from app.security import hash_token, new_token
from app.settings import Settings
from app.storage import Storage
from coreloop.synthetic import SYNTHETIC_CLASSES, render_lesion
from tests.membership import grant_all

CHROMIUM = "/usr/lib/chromium/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():  # .ci/run installs it
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": [
            *browser_type_launch_args.get("args", []),
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": {"width": 1280, "height": 860}}


@dataclass
class LiveServer:
    """The running API and direct access to its database and storage for seeding."""

    url: str
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    _names: Iterator[int] = field(default_factory=itertools.count)

    # -- seeding -----------------------------------------------------------------------------

    def user(self, role: Role = Role.annotator, name: str | None = None) -> tuple[int, str]:
        """A user; returns (id, plain token)."""
        token = new_token()
        with unit_of_work(self.sessions) as session:
            user = User(
                name=name or f"{role.value}-{next(self._names)}",
                role=role.value,
                token_hash=hash_token(token),
            )
            session.add(user)
            session.flush()
            grant_all(session)
            return user.id, token

    def project(self, **fields: Any) -> int:
        values: dict[str, Any] = {
            "name": f"project-{uuid.uuid4().hex[:6]}",
            "task": "classification",
            "classes": list(SYNTHETIC_CLASSES),
            "budget_count": 4,
            "initial_fraction": 0.1,
            "strategy": "confident_coreset",
            "alpha": 0.25,
            "overlap": 1,
            "lease_ttl_seconds": 600,
        }
        values.update(fields)
        with unit_of_work(self.sessions) as session:
            project = Project(**values)
            session.add(project)
            session.flush()
            grant_all(session)
            return project.id

    def image(
        self,
        project_id: int,
        pixels: np.ndarray,
        *,
        split: str = "pool",
        meta: dict[str, Any] | None = None,
    ) -> int:
        """An image row with its PNG file in storage; ``pixels`` is uint8 [H, W, 3]."""
        data = png(pixels)
        key = f"images/{project_id}/{uuid.uuid4().hex}.png"
        sha = self.storage.put_bytes(key, data)
        height, width = pixels.shape[:2]
        with unit_of_work(self.sessions) as session:
            image = Image(
                project_id=project_id,
                sha256=sha,
                storage_key=key,
                filename=f"lesion-{next(self._names)}.png",
                content_type="image/png",
                width=width,
                height=height,
                split=split,
                meta=meta or {},
            )
            session.add(image)
            session.flush()
            return image.id

    def lesions(
        self, project_id: int, n: int, *, size: int = 96, split: str = "pool", seed: int = 0
    ) -> list[int]:
        """``n`` synthetic lesion images (marked ``meta.synthetic``)."""
        rng = np.random.default_rng(seed)
        ids = []
        for i in range(n):
            name = SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)]
            sample = render_lesion(rng, name, size)
            ids.append(self.image(project_id, sample.image, split=split, meta={"synthetic": True}))
        return ids

    def round(self, project_id: int, number: int, **fields: Any) -> int:
        """A round row as the worker leaves it (``done`` unless told otherwise)."""
        values: dict[str, Any] = {
            "status": "done",
            "strategy": "confident_coreset",
            "alpha": 0.25,
            "budget": 4,
            "progress": {"phase": "done"},
            "metrics": {},
            "finished_at": utcnow(),
        }
        values.update(fields)
        with unit_of_work(self.sessions) as session:
            row = Round(project_id=project_id, number=number, **values)
            session.add(row)
            session.flush()
            return row.id

    def queue(self, project_id: int, round_id: int, image_ids: list[int]) -> None:
        with unit_of_work(self.sessions) as session:
            session.add_all(
                QueueItem(
                    project_id=project_id,
                    image_id=image_id,
                    round_id=round_id,
                    rank=rank,
                    min_distance=0.4,
                    predicted_loss=1.2,
                    score=0.7,
                    labels_needed=1,
                )
                for rank, image_id in enumerate(image_ids)
            )

    def model(self, project_id: int, round_id: int, metrics: dict[str, Any]) -> int:
        """A model version with a (fake) checkpoint file in storage."""
        key = f"checkpoints/{project_id}/{uuid.uuid4().hex}.pt"
        blob = b"checkpoint:" + uuid.uuid4().bytes
        sha = self.storage.put_bytes(key, blob)
        with unit_of_work(self.sessions) as session:
            version = ModelVersion(
                project_id=project_id,
                round_id=round_id,
                checkpoint_key=key,
                sha256=sha,
                metrics=metrics,
            )
            session.add(version)
            session.flush()
            return version.id

    def prediction(
        self,
        model_id: int,
        image_id: int,
        *,
        class_probs: list[float] | None = None,
        mask: np.ndarray | None = None,
    ) -> None:
        mask_key = None
        if mask is not None:
            mask_key = f"predictions/{model_id}/{uuid.uuid4().hex}.png"
            self.storage.put_bytes(mask_key, png(np.where(mask, 255, 0).astype(np.uint8)))
        with unit_of_work(self.sessions) as session:
            session.add(
                Prediction(
                    model_version_id=model_id,
                    image_id=image_id,
                    class_probs=class_probs,
                    mask_key=mask_key,
                    predicted_loss=1.0,
                )
            )

    # -- reading back through the API ----------------------------------------------------------

    def get(self, token: str, path: str, **params: Any) -> Any:
        response = httpx.get(
            f"{self.url}{path}", params=params, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, response.text
        return response.json() if "json" in response.headers["content-type"] else response


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    """A real API server on 127.0.0.1 for the browser, on its own SQLite database."""
    data = tmp_path / "data"
    settings = Settings(
        environment="test",
        data_dir=data,
        database_url=f"sqlite:///{data / 'coreloop.sqlite'}",
        embedded_worker=False,
    )
    app = create_app(settings)
    sock = _free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    engine = make_engine(settings)
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{port}",
            settings=settings,
            sessions=make_sessionmaker(engine),
            storage=Storage(settings.files_dir),
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.dispose()
        sock.close()


@pytest.fixture
def page_errors(page: Page) -> Iterator[list[str]]:
    """Uncaught page errors and CSP violations; the test fails if any happened."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda msg: (
            errors.append(f"console: {msg.text}")
            if msg.type == "error" and "Content Security Policy" in msg.text
            else None
        ),
    )
    yield errors
    assert errors == []


@pytest.fixture
def screenshot(page: Page) -> Any:
    """``screenshot(name)`` writes ``artifacts/screenshots/<name>.png`` (git-ignored)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(name: str, *, full_page: bool = False) -> Path:
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    return take
