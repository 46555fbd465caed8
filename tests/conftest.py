"""Shared fixtures: every API test runs on SQLite and on the machine's PostgreSQL.

Each test session creates its own PostgreSQL database (``coreloop_test_<pid>_<n>``) from the
server's ``test`` database, migrates it with Alembic, and drops it at the end, so parallel
runs never collide. Tests that go through ``client``/``db`` share one connection whose outer
transaction is rolled back after the test (commits inside become savepoint releases).
Tests that need real commits across threads or processes create their own database with
``new_database_url(kind, directory)`` and migrate it.
"""

from __future__ import annotations

import io
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine.url import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine
from app.main import create_app
from app.migrate import upgrade
from app.models import Image, Project, Role, User
from app.security import hash_token, new_token
from app.settings import Settings
from app.storage import Storage
from tests.membership import grant_all

# An app started in this process would freeze every object alive at its start-up, those of
# earlier tests included, which then never leave memory if they are cyclic garbage later.
os.environ.setdefault("CORELOOP_GC_FREEZE", "false")

PG_SERVER_URL = os.environ.get(
    "CORELOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
_counter = itertools.count()
_created_pg: list[str] = []


def create_pg_database() -> str:
    """Create an empty PostgreSQL database on the test server; returns its URL."""
    name = f"coreloop_test_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    _created_pg.append(name)
    return make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)


def _drop_pg_databases() -> None:
    if not _created_pg:
        return
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in _created_pg:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _drop_pg_databases()


def new_database_url(kind: str, directory: Path) -> str:
    """A new, empty database of ``kind`` (``sqlite`` | ``postgresql``)."""
    if kind == "sqlite":
        return f"sqlite:///{directory / f'db-{uuid.uuid4().hex[:8]}.sqlite'}"
    return create_pg_database()


DB_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=DB_KINDS)
def db_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def _migrated_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    """One migrated database per kind for the whole session (built lazily)."""
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


def _engine_for(kind: str, cache: dict[str, Engine], directory: Path) -> Engine:
    if kind not in cache:
        engine = make_engine(
            Settings(data_dir=directory, database_url=new_database_url(kind, directory))
        )
        upgrade(engine)
        cache[kind] = engine
    return cache[kind]


@pytest.fixture
def connection(
    db_kind: str, _migrated_engines: dict[str, Engine], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Connection]:
    """A connection inside a transaction that is rolled back after the test."""
    engine = _engine_for(db_kind, _migrated_engines, tmp_path_factory.mktemp("db"))
    conn = engine.connect()
    outer = conn.begin()
    try:
        yield conn
    finally:
        if outer.is_active:
            outer.rollback()
        conn.close()


@pytest.fixture
def session_factory(connection: Connection) -> sessionmaker[Session]:
    return sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


@pytest.fixture
def db(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    """An ORM session on the test's connection, for setting up rows directly."""
    session = session_factory()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def settings(tmp_path: Path, connection: Connection) -> Settings:
    url = connection.engine.url.render_as_string(hide_password=False)
    return Settings(
        environment="test", data_dir=tmp_path / "data", database_url=url, max_upload_bytes=2_000_000
    )


@pytest.fixture
def storage(settings: Settings) -> Storage:
    return Storage(settings.files_dir)


@pytest.fixture
def app(settings: Settings, session_factory: sessionmaker[Session]) -> Any:
    application = create_app(settings, migrate=False)
    application.state.sessions = session_factory
    return application


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def _make_user(db: Session, name: str, role: Role, member: bool = True) -> tuple[User, str]:
    token = new_token()
    user = User(name=name, role=role.value, token_hash=hash_token(token))
    db.add(user)
    db.flush()
    if member:
        grant_all(db)
    db.commit()
    return user, token


@pytest.fixture
def make_user(db: Session) -> Callable[..., tuple[User, str]]:
    """``make_user(name, role, member=True)`` -> (user, plain token). With ``member``, an
    annotator or reviewer is a member of every project (``tests/membership.py``)."""

    def factory(
        name: str | None = None, role: Role = Role.annotator, member: bool = True
    ) -> tuple[User, str]:
        return _make_user(db, name or f"user-{uuid.uuid4().hex[:6]}", role, member)

    return factory


@pytest.fixture
def admin_headers(make_user: Callable[..., tuple[User, str]]) -> dict[str, str]:
    _, token = make_user("admin", Role.admin)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def annotator_headers(make_user: Callable[..., tuple[User, str]]) -> dict[str, str]:
    _, token = make_user("annotator", Role.annotator)
    return {"Authorization": f"Bearer {token}"}


def png_bytes(
    width: int = 32,
    height: int = 24,
    color: tuple[int, int, int] = (200, 80, 60),
    mode: str = "RGB",
) -> bytes:
    """A small real PNG image."""
    buf = io.BytesIO()
    PILImage.new(mode, (width, height), color if mode == "RGB" else color[0]).save(
        buf, format="PNG"
    )
    return buf.getvalue()


@pytest.fixture
def make_project(db: Session) -> Callable[..., Project]:
    """Insert a project row directly (tests of other endpoints need not go through POST).
    ``members=False``: nobody is a member (else every annotator and reviewer is one)."""

    def factory(members: bool = True, **overrides: Any) -> Project:
        values: dict[str, Any] = {
            "name": f"project-{uuid.uuid4().hex[:8]}",
            "task": "classification",
            "classes": ["benign", "malignant"],
            "budget_count": 4,
            "initial_fraction": 0.1,
            "strategy": "confident_coreset",
            "alpha": 0.25,
            "overlap": 1,
            "lease_ttl_seconds": 600,
        }
        values.update(overrides)
        project = Project(**values)
        db.add(project)
        db.flush()
        if members:
            grant_all(db)
        db.commit()
        return project

    return factory


@pytest.fixture
def make_image(db: Session, storage: Storage) -> Callable[..., Image]:
    """Insert an image row with a real PNG stored under its key."""
    counter = itertools.count()

    def factory(project: Project, split: str = "pool", width: int = 32, height: int = 24) -> Image:
        n = next(counter)
        rnd = uuid.uuid4().bytes
        data = png_bytes(width, height, color=(rnd[0], rnd[1], rnd[2]))
        data += rnd  # trailing bytes keep every file (and its hash) unique
        key = f"images/{project.id}/{uuid.uuid4().hex}.png"
        sha = storage.put_bytes(key, data)
        image = Image(
            project_id=project.id,
            sha256=sha,
            storage_key=key,
            filename=f"img{n}.png",
            content_type="image/png",
            width=width,
            height=height,
            split=split,
            meta={},
        )
        db.add(image)
        db.commit()
        return image

    return factory
