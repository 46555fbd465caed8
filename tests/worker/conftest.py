"""Fixtures of the worker tests: fresh migrated databases with real commits, and tiny projects
of synthetic lesion images (``coreloop.synthetic``: skin-toned background, one lesion per image
whose colour and shape depend on its class; not medical data)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.migrate import upgrade
from app.models import Image, Label, Project, Round, RoundStatus, User
from app.security import hash_token
from app.settings import Settings
from app.storage import Storage
from coreloop.synthetic import SYNTHETIC_CLASSES, render_lesion
from tests.conftest import new_database_url
from worker.embedded import settings_env, start_worker, stop_worker


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Seeded:
    """A project made by :func:`seed_project`: image ids and the truth of every image."""

    project_id: int
    task: str
    pool: list[int]
    test: list[int]
    classes: dict[int, int]  # image id -> class index
    masks: dict[int, np.ndarray]  # image id -> uint8 mask {0, 255}


def seed_project(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    task: str = "classification",
    n_pool: int = 40,
    n_test: int = 10,
    size: int = 32,
    n_classes: int = 3,
    label_test: bool = True,
    seed: int = 0,
    **project_fields: Any,
) -> Seeded:
    """Insert a project with ``n_pool`` + ``n_test`` synthetic PNG images (test labeled)."""
    rng = np.random.default_rng(seed)
    class_names = list(SYNTHETIC_CLASSES[:n_classes]) if task == "classification" else ["lesion"]
    fields: dict[str, Any] = {
        "name": f"project-{uuid.uuid4().hex[:8]}",
        "task": task,
        "classes": class_names,
        "budget_count": 5,
        "initial_fraction": 0.25,
        "strategy": "confident_coreset",
        "alpha": 0.25 if task == "classification" else 0.5,
        "overlap": 1,
        "image_size": 32,
        "epochs": 1,
        "batch_size": 8,
        **project_fields,
    }
    with unit_of_work(sessions) as session:
        project = Project(**fields)
        session.add(project)
        session.flush()
        seeded = Seeded(project.id, task, [], [], {}, {})
        for i in range(n_pool + n_test):
            cls = i % n_classes
            sample = render_lesion(rng, SYNTHETIC_CLASSES[cls], size)
            data = png(sample.image)
            key = f"images/{project.id}/{uuid.uuid4().hex}.png"
            split = "pool" if i < n_pool else "test"
            image = Image(
                project_id=project.id,
                sha256=storage.put_bytes(key, data),
                storage_key=key,
                filename=f"img{i}.png",
                content_type="image/png",
                width=size,
                height=size,
                split=split,
                meta={},
            )
            session.add(image)
            session.flush()
            (seeded.pool if split == "pool" else seeded.test).append(image.id)
            seeded.classes[image.id] = cls if task == "classification" else 0
            seeded.masks[image.id] = sample.mask
    if label_test:
        add_labels(sessions, storage, seeded, seeded.test)
    return seeded


def add_labels(
    sessions: sessionmaker[Session],
    storage: Storage,
    seeded: Seeded,
    image_ids: Sequence[int],
    *,
    class_index: int | None = None,
) -> list[int]:
    """Label ``image_ids`` with their true class (or ``class_index``) or mask; returns label ids."""
    with unit_of_work(sessions) as session:
        task = session.scalar(select(Project.task).where(Project.id == seeded.project_id))
        labels = []
        for image_id in image_ids:
            label = Label(
                project_id=seeded.project_id,
                image_id=image_id,
                source="import",
                idempotency_key=uuid.uuid4().hex,
            )
            if task == "classification":
                label.class_index = seeded.classes[image_id] if class_index is None else class_index
            else:
                key = f"masks/{seeded.project_id}/{uuid.uuid4().hex}.png"
                storage.put_bytes(key, png(seeded.masks[image_id]))
                label.mask_key = key
            session.add(label)
            labels.append(label)
        session.flush()
        return [label.id for label in labels]


def new_round(
    sessions: sessionmaker[Session], project_id: int, *, budget: int = 5, **fields: Any
) -> int:
    """Insert the project's next round, queued (as ``POST /rounds`` does, without sending)."""
    with unit_of_work(sessions) as session:
        project = session.get(Project, project_id)
        assert project is not None
        number = session.scalar(
            select(Round.number).where(Round.project_id == project_id).order_by(Round.number.desc())
        )
        row = Round(
            project_id=project_id,
            number=0 if number is None else number + 1,
            status=RoundStatus.queued.value,
            strategy=project.strategy,
            alpha=project.alpha,
            budget=budget,
            progress={},
            metrics={},
            attempt=0,
            cancel_requested=False,
            **fields,
        )
        session.add(row)
        session.flush()
        return row.id


def make_admin(sessions: sessionmaker[Session], token: str, name: str = "admin") -> int:
    with unit_of_work(sessions) as session:
        user = User(name=name, role="admin", token_hash=hash_token(token))
        session.add(user)
        session.flush()
        return user.id


def fresh_settings(kind: str, directory: Path, **overrides: Any) -> Settings:
    """Settings on a new, migrated database of ``kind`` under ``directory``."""
    values: dict[str, Any] = {
        "environment": "test",
        "data_dir": directory / "data",
        "database_url": new_database_url(kind, directory),
        "heartbeat_seconds": 0.5,
        "heartbeat_timeout_seconds": 30.0,
        "round_max_attempts": 3,
        **overrides,
    }
    settings = Settings(**values)
    engine = make_engine(settings)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return settings


@pytest.fixture
def worker_settings(db_kind: str, tmp_path: Path) -> Settings:
    return fresh_settings(db_kind, tmp_path)


@pytest.fixture
def engine(worker_settings: Settings) -> Iterator[Engine]:
    engine = make_engine(worker_settings)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(engine)


@pytest.fixture
def file_storage(worker_settings: Settings) -> Storage:
    return Storage(worker_settings.files_dir)


def read_round(sessions: sessionmaker[Session], round_id: int) -> Round:
    with unit_of_work(sessions) as session:
        row = session.get(Round, round_id)
        assert row is not None
        return row


# --- end-to-end: the real API (uvicorn) and a real worker process -------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Processes:
    """Child processes of an end-to-end test, stopped at teardown; logs kept for failures."""

    tmp: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def log(self, name: str) -> IO[bytes]:
        path = self.tmp / f"{name}-{len(self.logs)}.log"
        self.logs.append(path)
        return path.open("wb")

    def start_api(self, settings: Settings) -> str:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        with self.log("api") as out:
            proc = subprocess.Popen(
                command,
                env={**os.environ, **settings_env(settings)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _healthy(url, proc), 60, "the API to answer /health")
        return url

    def start_worker(
        self, settings: Settings, *, exclusive: bool = True
    ) -> subprocess.Popen[bytes]:
        with self.log("worker") as out:
            proc = start_worker(settings, exclusive=exclusive, log_file=out)
        self.running.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            stop_worker(proc, timeout=10)

    def dump_logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-6000:]}" for p in self.logs
        )


def _healthy(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the API exited with {proc.returncode}")
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(procs.dump_logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def lesion_png(rng: np.random.Generator, class_index: int, size: int = 32) -> bytes:
    return png(render_lesion(rng, SYNTHETIC_CLASSES[class_index], size).image)


class ApiClient:
    """The HTTP surface as an admin sees it."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        )

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code < 300, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        return response.json()

    def create_project(self, **fields: Any) -> int:
        body = {
            "name": f"e2e-{uuid.uuid4().hex[:8]}",
            "task": "classification",
            "classes": list(SYNTHETIC_CLASSES),
            "budget": 6,
            "initial_fraction": 0.25,
            "image_size": 32,
            "epochs": 2,
            "batch_size": 8,
            **fields,
        }
        return int(self.ok("POST", "/projects", json=body)["id"])

    def upload(
        self, project_id: int, pngs: Sequence[bytes], split: str, label: str | None = None
    ) -> list[int]:
        files = [("files", (f"{uuid.uuid4().hex}.png", data, "image/png")) for data in pngs]
        form = {"split": split, **({"label": label} if label else {})}
        result = self.ok("POST", f"/projects/{project_id}/images", files=files, data=form)
        return [int(item["image"]["id"]) for item in result["items"]]

    def label(self, image_id: int, class_index: int, lease_id: int | None = None) -> None:
        body = {
            "image_id": image_id,
            "class_index": class_index,
            "idempotency_key": uuid.uuid4().hex,
        }
        if lease_id is not None:
            body["lease_id"] = lease_id
        self.ok("POST", "/labels", json=body)

    def start_round(self, project_id: int) -> int:
        return int(self.ok("POST", "/rounds", json={"project_id": project_id})["id"])

    def round(self, round_id: int) -> dict[str, Any]:
        result: dict[str, Any] = self.ok("GET", f"/rounds/{round_id}")
        return result

    def wait_round(self, round_id: int, timeout: float = 240) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            row = self.round(round_id)
            return row if row["status"] in ("done", "failed", "cancelled") else None

        row: dict[str, Any] = wait_until(finished, timeout, f"round {round_id} to finish")
        assert row["status"] == "done", row
        return row
