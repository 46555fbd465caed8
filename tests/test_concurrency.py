"""Leasing and labeling under real concurrency: 32 threads, real commits, SQLite and PostgreSQL.

Each thread is an annotator with its own sessions going through the real service functions.
A monitor thread watches, while they run, that no item is ever held (active or done leases)
by more annotators than the project's overlap.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.errors import Conflict
from app.labels.schemas import LabelCreate
from app.labels.service import create_label
from app.migrate import upgrade
from app.models import Image, Label, Lease, Project, QueueItem, Role, Round, User
from app.queue.service import lease_next_items, release_lease
from app.rounds.service import create_round
from app.settings import Settings
from app.storage import Storage
from tests.conftest import new_database_url
from tests.membership import grant_all

pytestmark = pytest.mark.slow

ANNOTATORS = 32
ITEMS = 64


@dataclass
class World:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    project_id: int
    user_ids: list[int]
    posted: list[int] = field(default_factory=list)  # ids of labels whose commit succeeded
    lock: threading.Lock = field(default_factory=threading.Lock)


def _populate(sessions: sessionmaker[Session], overlap: int) -> tuple[int, list[int]]:
    with unit_of_work(sessions) as session:
        project = Project(
            name="concurrency",
            task="classification",
            classes=["a", "b"],
            budget_count=ITEMS,
            alpha=0.25,
            overlap=overlap,
            lease_ttl_seconds=600,
        )
        users = [
            User(name=f"a{i}", role=Role.annotator.value, token_hash=f"{i:064d}")
            for i in range(ANNOTATORS)
        ]
        session.add_all([project, *users])
        session.flush()
        grant_all(session)  # every annotator a member of the project
        rnd = Round(
            project_id=project.id,
            number=0,
            status="done",
            strategy="random",
            alpha=0.25,
            budget=ITEMS,
        )
        images = [
            Image(
                project_id=project.id,
                sha256=f"{i:064x}",
                storage_key=f"images/x/{i}.png",
                filename=f"{i}.png",
                content_type="image/png",
                width=8,
                height=8,
                meta={},
            )
            for i in range(ITEMS)
        ]
        session.add_all([rnd, *images])
        session.flush()
        session.add_all(
            QueueItem(
                project_id=project.id,
                image_id=image.id,
                round_id=rnd.id,
                rank=rank,
                labels_needed=overlap,
            )
            for rank, image in enumerate(images)
        )
        return project.id, [user.id for user in users]


@pytest.fixture
def world_factory(db_kind: str, tmp_path: Path) -> Iterator[Callable[[int], World]]:
    engines = []

    def build(overlap: int) -> World:
        url = new_database_url(db_kind, tmp_path)
        settings = Settings(environment="test", data_dir=tmp_path / "data", database_url=url)
        engine = make_engine(settings)
        engines.append(engine)
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        project_id, user_ids = _populate(sessions, overlap)
        return World(settings, sessions, Storage(settings.files_dir), project_id, user_ids)

    yield build
    for engine in engines:
        engine.dispose()


def _cycle(world: World, user_id: int, rng: random.Random) -> int:
    """One lease + label round trip of an annotator; returns how many items it was given."""
    with unit_of_work(world.sessions) as session:
        user = session.get_one(User, user_id)
        entries = lease_next_items(session, world.settings, user, world.project_id, limit=2)
    for entry in entries:
        with unit_of_work(world.sessions) as session:
            user = session.get_one(User, user_id)
            if rng.random() < 0.1:
                release_lease(session, user, entry.lease_id)
                continue
            data = LabelCreate(
                image_id=entry.image_id,
                lease_id=entry.lease_id,
                idempotency_key=uuid.uuid4().hex,
                class_index=rng.randrange(2),
            )
            label, created = create_label(session, world.settings, world.storage, user, data)
            assert created
            label_id = label.id
        with world.lock:
            world.posted.append(label_id)
    return len(entries)


def _annotate(world: World, user_id: int, start: threading.Barrier) -> None:
    rng = random.Random(user_id)
    start.wait()
    while _cycle(world, user_id, rng):
        pass


def _over_leased(world: World, overlap: int) -> list[tuple[int, int]]:
    """Items held (active or done leases) by more than ``overlap`` annotators right now."""
    with unit_of_work(world.sessions) as session:
        rows = session.execute(
            select(Lease.queue_item_id, func.count(Lease.id))
            .where(Lease.project_id == world.project_id, Lease.state.in_(("active", "done")))
            .group_by(Lease.queue_item_id)
            .having(func.count(Lease.id) > overlap)
        ).all()
    return [(item_id, count) for item_id, count in rows]


def _watch(world: World, overlap: int, stop: threading.Event, seen: list[object]) -> None:
    while not stop.is_set():
        seen.extend(_over_leased(world, overlap))
        stop.wait(0.01)


@pytest.mark.parametrize("overlap", [1, 2])
def test_concurrent_annotators_never_exceed_overlap(
    world_factory: Callable[[int], World], overlap: int
) -> None:
    world = world_factory(overlap)
    start, stop, violations = threading.Barrier(ANNOTATORS), threading.Event(), []
    monitor = threading.Thread(target=_watch, args=(world, overlap, stop, violations))
    monitor.start()
    try:
        with ThreadPoolExecutor(ANNOTATORS) as pool:
            for future in [pool.submit(_annotate, world, uid, start) for uid in world.user_ids]:
                future.result()
    finally:
        stop.set()
        monitor.join()
    # SKIP LOCKED may hide an item that was being leased at the moment an annotator asked;
    # a sequential sweep takes what is left, so that completeness can be asserted.
    rng = random.Random(0)
    while sum(_cycle(world, uid, rng) for uid in world.user_ids):
        pass

    assert violations == []
    assert _over_leased(world, overlap) == []
    with unit_of_work(world.sessions) as session:
        labels = session.execute(
            select(Label.id, Label.image_id, Label.author_id).where(
                Label.project_id == world.project_id
            )
        ).all()
        needed = session.scalars(select(QueueItem.labels_needed)).all()
    assert sorted(label_id for label_id, _, _ in labels) == sorted(world.posted)  # none lost
    per_image: dict[int, list[int | None]] = {}
    for _, image_id, author_id in labels:
        per_image.setdefault(image_id, []).append(author_id)
    assert len(per_image) == ITEMS
    assert all(len(authors) == overlap for authors in per_image.values())
    assert all(len(set(authors)) == overlap for authors in per_image.values())
    assert set(needed) == {0}


def _at_once(n: int, fn: Callable[[], object]) -> list[object]:
    """Run ``fn`` in ``n`` threads released together; returns results or exceptions."""
    start = threading.Barrier(n)

    def run() -> object:
        start.wait()
        try:
            return fn()
        except Exception as exc:  # the outcome under test, compared below
            return exc

    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(run) for _ in range(n)]]


def test_concurrent_identical_label_posts_store_one_row(
    world_factory: Callable[[int], World],
) -> None:
    world = world_factory(1)
    with unit_of_work(world.sessions) as session:
        image_id = session.scalars(select(QueueItem.image_id)).first()
    assert image_id is not None
    data = LabelCreate(image_id=image_id, idempotency_key="same-key", class_index=1)

    def post() -> tuple[int, bool]:
        with unit_of_work(world.sessions) as session:
            user = session.get_one(User, world.user_ids[0])
            label, created = create_label(session, world.settings, world.storage, user, data)
            return label.id, created

    results = _at_once(8, post)

    assert all(isinstance(result, tuple) for result in results), results
    assert len({result[0] for result in results if isinstance(result, tuple)}) == 1
    assert sum(1 for result in results if isinstance(result, tuple) and result[1]) == 1
    with unit_of_work(world.sessions) as session:
        assert session.scalar(select(func.count(Label.id))) == 1
        assert (
            session.scalar(select(QueueItem.labels_needed).where(QueueItem.image_id == image_id))
            == 0
        )


def test_concurrent_round_requests_create_one_round(world_factory: Callable[[int], World]) -> None:
    world = world_factory(1)

    def post() -> int:
        with unit_of_work(world.sessions) as session:
            return create_round(session, world.settings, world.project_id, None).id

    results = _at_once(8, post)

    created = [result for result in results if isinstance(result, int)]
    refused = [result for result in results if isinstance(result, Conflict)]
    assert len(created) == 1 and len(refused) == 7, results
    assert {error.code for error in refused} == {"RoundAlreadyActive"}
