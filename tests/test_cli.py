"""The CLI, in-process: ``main([...])`` with settings from CORELOOP_ environment variables."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import inspect

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.main import create_app
from app.projects.schemas import ProjectCreate
from app.projects.service import create_project
from app.settings import get_settings
from coreloop.cli import default_workers, main
from tests.conftest import new_database_url


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_kind: str) -> Iterator[Path]:
    """CORELOOP_DATA_DIR in tmp_path; the database is a fresh SQLite file or PostgreSQL db."""
    monkeypatch.setenv("CORELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CORELOOP_DATABASE_URL", new_database_url(db_kind, tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _token_from(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("cl_"))


def test_users_create_prints_a_token_that_authenticates(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["users", "create", "--name", "alice", "--role", "admin"]) == 0
    out = capsys.readouterr().out
    assert "shown only once" in out
    token = _token_from(out)
    with TestClient(create_app(get_settings())) as client:
        me = client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    assert me.json() == {**me.json(), "name": "alice", "role": "admin"}


def test_duplicate_user_is_a_friendly_error(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["users", "create", "--name", "bob"]) == 0
    capsys.readouterr()
    assert main(["users", "create", "--name", "bob"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert "bob" in captured.err and "Traceback" not in captured.err
    assert "cl_" not in captured.out


def test_db_upgrade_creates_the_schema(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    assert "up to date" in capsys.readouterr().out
    engine = make_engine(get_settings())
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"users", "projects", "images", "labels", "alembic_version"} <= tables


def _make_project(name: str, classes: list[str]) -> None:
    engine = make_engine(get_settings())
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            create_project(
                session, ProjectCreate(name=name, task="classification", classes=classes)
            )
    finally:
        engine.dispose()


def test_members_add_list_remove(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    _make_project("derm", ["benign", "malignant"])
    assert main(["users", "create", "--name", "ann"]) == 0
    capsys.readouterr()
    assert main(["users", "create", "--name", "rev", "--role", "reviewer"]) == 0
    token = _token_from(capsys.readouterr().out)  # the reviewer's
    assert main(["members", "add", "derm", "ann"]) == 0
    assert main(["members", "add", "derm", "rev"]) == 0
    assert "added 'rev' to project 'derm' as reviewer" in capsys.readouterr().out
    assert main(["members", "list", "derm"]) == 0
    listed = [line.split("\t")[1:] for line in capsys.readouterr().out.splitlines()]
    assert listed == [["ann", "annotator"], ["rev", "reviewer"]]
    with TestClient(create_app(get_settings())) as client:
        mine = client.get("/projects", headers={"Authorization": f"Bearer {token}"}).json()
    assert [p["name"] for p in mine] == ["derm"]
    assert main(["members", "add", "derm", "ann"]) == 2
    assert "already a member" in capsys.readouterr().err
    assert main(["members", "remove", "derm", "ann"]) == 0
    assert main(["members", "remove", "derm", "ann"]) == 2
    assert "not a member" in capsys.readouterr().err
    with TestClient(create_app(get_settings())) as client:
        mine = client.get("/projects", headers={"Authorization": f"Bearer {token}"}).json()
    assert [p["name"] for p in mine] == ["derm"]  # rev, the reviewer, is still a member


def test_import_folders_with_labels(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "upgrade"]) == 0
    _make_project("derm", ["benign", "malignant"])
    for n in range(3):
        folder = env / "set" / ("benign" if n else "malignant")
        folder.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (8, 8), (n * 50, 0, 0)).save(folder / f"{n}.png")
    argv = ["import", "--project", "derm", "--images", str(env / "set"), "--layout", "folders"]
    argv += ["--with-labels", "--split", "test", "--no-progress"]
    assert main(argv) == 0
    assert "created 3, duplicates 0, labeled 3, errors 0" in capsys.readouterr().out
    assert main(argv) == 0
    assert "created 0, duplicates 3, labeled 0, errors 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["import", "--project", "ghost", "--images", "."], "ghost"),
        (["import", "--project", "derm", "--images", "/no/such/dir"], "not found"),
    ],
)
def test_import_errors_are_friendly(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["db", "upgrade"]) == 0
    _make_project("derm", ["a", "b"])
    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["users", "create"],
        ["users", "create", "--name", "x", "--role", "boss"],
        ["import", "--project", "p", "--images", ".", "--layout", "coco"],
        ["import", "--project", "p", "--images", ".", "--limit", "0"],
        ["serve", "--port", "http"],
        ["db", "upgrade", "--extra"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_serve_upgrades_then_runs_uvicorn(
    env: Path, db_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append((a, kw)))
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--no-worker"]) == 0
    # One process on SQLite (one writer at a time), one per core on PostgreSQL.
    workers = default_workers(sqlite=db_kind == "sqlite")
    expected = {"factory": True, "host": "0.0.0.0", "port": 8123, "workers": workers,
                "access_log": False}  # fmt: skip
    assert calls == [(("app.main:create_app",), expected)]
    assert default_workers(sqlite=True) == 1
    assert 1 <= default_workers(sqlite=False) <= min(8, os.cpu_count() or 1)
    assert main(["serve", "--no-worker", "--workers", "3", "--access-log"]) == 0
    assert calls[-1][1] | {"host": "0.0.0.0", "port": 8123} == {**expected, "workers": 3,
                                                                 "access_log": True}  # fmt: skip
    engine = make_engine(get_settings())
    try:
        assert "users" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.fixture
def celery_main(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Celery's blocking ``worker_main`` replaced by a recorder: what ``coreloop worker`` ran."""
    from worker.celery_app import app as celery_app

    started: list[list[str]] = []
    monkeypatch.setattr(celery_app, "worker_main", lambda argv: started.append(list(argv)))
    return started


@pytest.mark.parametrize("revision", [None, "first"])
def test_worker_refuses_a_schema_that_is_not_current(
    env: Path,
    revision: str | None,
    celery_main: list[list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An empty database, or one a migration behind: one line naming the fix, no Celery."""
    from alembic.script import ScriptDirectory

    from app.migrate import alembic_config, upgrade

    engine = make_engine(get_settings())
    try:
        if revision == "first":
            base = ScriptDirectory.from_config(alembic_config()).get_base()
            assert isinstance(base, str)
            upgrade(engine, base)
        tables_before = set(inspect(engine).get_table_names())
        assert main(["worker", "--queues", "training"]) == 2
        assert set(inspect(engine).get_table_names()) == tables_before  # nothing migrated
    finally:
        engine.dispose()
    err = capsys.readouterr().err
    assert err.startswith("error: the database schema is not current")
    assert "coreloop db upgrade" in err and "Traceback" not in err
    assert celery_main == []


def test_worker_starts_celery_once_the_schema_is_current(
    env: Path, celery_main: list[list[str]]
) -> None:
    assert main(["db", "upgrade"]) == 0
    assert main(["worker", "--queues", "training", "--concurrency", "2"]) == 0
    [argv] = celery_main
    assert "--queues=training" in argv and "--concurrency=2" in argv


def test_bench_select_forwards_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("ml.bench")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ml.bench", fake)
    assert main(["bench", "select", "--rounds", "3", "-h", "pos"]) == 0
    assert seen == [["--rounds", "3", "-h", "pos"]]


def test_invalid_settings_are_a_friendly_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORELOOP_MAX_UPLOAD_BYTES", "lots")
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 2
    finally:
        get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("error: invalid settings") and "Traceback" not in err


def test_agreement_prints_the_readers_figures(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.models import Label, Project, ProjectMember, User
    from app.projects.service import find_project

    assert main(["db", "upgrade"]) == 0
    _make_project("double", ["benign", "malignant"])
    engine = make_engine(get_settings())
    try:
        with unit_of_work(make_sessionmaker(engine)) as session:
            project = find_project(session, "double")
            project.overlap = 2
            users = [User(name=n, role="annotator", token_hash=n * 8) for n in ("ana", "ben")]
            session.add_all(users)
            session.flush()
            session.add_all(ProjectMember(project_id=project.id, user_id=u.id) for u in users)
            for i, (a, b) in enumerate([(0, 0), (1, 1), (0, 1), (1, 1)]):
                image = _image_row(session, project, i)
                for user, cls in zip(users, (a, b), strict=True):
                    label = Label(project_id=project.id, image_id=image, author_id=user.id,
                                  class_index=cls, idempotency_key=f"{i}-{user.name}")  # fmt: skip
                    session.add(label)
            assert isinstance(project, Project)
    finally:
        engine.dispose()
    capsys.readouterr()
    assert main(["agreement", "double"]) == 0
    out = capsys.readouterr().out
    # By hand: 3 of 4 agree; ana 2/2 per class, ben 1/3: chance 0.5, kappa 0.5.
    assert "kappa (cohen): 0.500, raw agreement: 0.750 over 4 pairs" in out
    assert "adjudication rate: 0.250" in out
    assert main(["agreement", "double", "--json"]) == 0
    assert '"kappa": 0.5' in capsys.readouterr().out


def _image_row(session: Any, project: Any, i: int) -> int:
    from app.models import Image

    image = Image(project_id=project.id, sha256=f"{i:064x}", storage_key=f"x/{i}.png",
                  filename=f"{i}.png", content_type="image/png", width=8, height=8)  # fmt: skip
    session.add(image)
    session.flush()
    return int(image.id)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_stops_the_embedded_worker_before_serve_exits(tmp_path: Path) -> None:
    """One API process: uvicorn raises SIGTERM again after its shutdown; serve must still stop
    its worker first (docker stop, systemd), and then end by the signal."""
    port = _free_port()
    env = {**os.environ, "CORELOOP_DATA_DIR": str(tmp_path / "data")}
    env["CORELOOP_DATABASE_URL"] = f"sqlite:///{tmp_path / 'serve.sqlite'}"
    log = (tmp_path / "serve.log").open("w+")
    command = [sys.executable, "-m", "coreloop.cli", "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        worker_pid = None
        while time.monotonic() < deadline:
            text = (tmp_path / "serve.log").read_text()
            found = re.search(r"started the embedded worker \(pid (\d+)", text)
            worker_pid = int(found.group(1)) if found else None
            if worker_pid and "celery@" in text and "ready." in text:
                break
            assert process.poll() is None, text
            time.sleep(0.2)
        assert worker_pid is not None and _alive(worker_pid)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == -signal.SIGTERM
        assert not _alive(worker_pid), (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
