"""Load benchmark: simulated annotators leasing and labeling against the real server.

Starts uvicorn (``app.main:create_app``) on a free port of 127.0.0.1 with its data in a
temporary directory (SQLite there, or a fresh PostgreSQL database on 127.0.0.1:5432), fills
the database directly (users, a project, images, one done round of queue items), then runs
N annotator threads, each with its own HTTP connection, doing cycles of
``GET /queue?limit=1`` + ``POST /labels`` (with the lease): a warm-up first (not measured),
then a fixed measured time. Afterwards it counts in the database the items leased beyond the
project's overlap and the labels lost, and prints one JSON line: cycles/s, p50/p99 latency of
a cycle and of each call, CPU milliseconds per cycle of the server and of the annotators
(this process), and the load average (other work on the machine skews every figure).

    .venv/bin/python -m benchmarks.load --db sqlite --seconds 20 --annotators 16
    .venv/bin/python -m benchmarks.load --db postgresql --seconds 20 --annotators 16
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine.url import make_url

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.migrate import upgrade
from app.models import (
    Image,
    Label,
    Lease,
    Project,
    ProjectMember,
    QueueItem,
    Role,
    Round,
    User,
    utcnow,
)
from app.security import hash_token, new_token
from app.settings import Settings
from coreloop.cli import default_workers

PG_SERVER_URL = os.environ.get(
    "CORELOOP_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@dataclass
class Sample:
    """Latencies (seconds) of one annotator thread."""

    cycle: list[float] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    label: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    labels_posted: int = 0
    warmup_labels: int = 0  # posted during the warm-up (not in the latencies)
    empty_queue: int = 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its waited-for children (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live child processes (uvicorn's workers)."""
    total = _cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for child_pid in child.read_text().split():
            total += _tree_cpu_seconds(int(child_pid))
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _database_url(kind: str, directory: Path) -> Iterator[str]:
    """A fresh database of ``kind``; a PostgreSQL one is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'coreloop.sqlite'}"
        return
    name = f"coreloop_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_SERVER_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_SERVER_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _populate(settings: Settings, args: argparse.Namespace) -> tuple[int, list[str]]:
    """Migrate, then insert users, a project, images and queue items; returns tokens."""
    engine = make_engine(settings)
    upgrade(engine)
    tokens = [new_token() for _ in range(args.annotators)]
    with unit_of_work(make_sessionmaker(engine)) as session:
        project = Project(
            name="load",
            task="classification",
            classes=["benign", "malignant"],
            budget_count=args.items,
            alpha=0.25,
            overlap=args.overlap,
            lease_ttl_seconds=600,
        )
        session.add(project)
        users = [
            User(name=f"annotator-{i}", role=Role.annotator.value, token_hash=hash_token(token))
            for i, token in enumerate(tokens)
        ]
        session.add_all(users)
        session.flush()
        session.add_all(ProjectMember(project_id=project.id, user_id=u.id) for u in users)
        rnd = Round(
            project_id=project.id,
            number=0,
            status="done",
            strategy="random",
            alpha=0.25,
            budget=args.items,
            progress={},
            metrics={},
        )
        session.add(rnd)
        session.flush()
        now = utcnow()
        image_ids = session.scalars(
            insert(Image).returning(Image.id),
            [
                {
                    "project_id": project.id,
                    "sha256": f"{i:064x}",
                    "storage_key": f"images/{i}.png",
                    "filename": f"{i}.png",
                    "content_type": "image/png",
                    "width": 64,
                    "height": 64,
                    "split": "pool",
                    "meta": {},
                    "created_at": now,
                }
                for i in range(args.items)
            ],
        ).all()
        session.execute(
            insert(QueueItem),
            [
                {
                    "project_id": project.id,
                    "image_id": image_id,
                    "round_id": rnd.id,
                    "rank": rank,
                    "score": 1.0 / (rank + 1),
                    "labels_needed": args.overlap,
                    "created_at": now,
                }
                for rank, image_id in enumerate(image_ids)
            ],
        )
        project_id = project.id
    engine.dispose()
    return project_id, tokens


def _serve_command(port: int) -> list[str]:
    """``coreloop serve`` as the README starts it: its default processes, no access log, and
    the embedded worker (idle here)."""
    return [sys.executable, "-m", "coreloop.cli", "serve", "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip


@contextmanager
def _server(
    env: dict[str, str], port: int, workers: int, serve: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    command = (
        _serve_command(port)
        if serve
        else [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    )
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health", process)
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def _count_error(sample: Sample, response: httpx.Response) -> None:
    try:
        code = str(response.json().get("error"))
    except ValueError:
        code = f"HTTP{response.status_code}"
    sample.errors[code] = sample.errors.get(code, 0) + 1


def _annotate(
    base_url: str,
    token: str,
    project_id: int,
    window: tuple[float, float],
    start: threading.Barrier,
) -> Sample:
    """One annotator: lease one item, label it with its lease, until the window ends.

    Cycles before the window opens warm the server up (connections, statement caches) and
    are not recorded.
    """
    record_from, stop_at = window
    sample, warm = Sample(), Sample()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30.0) as client:
        start.wait()
        while time.monotonic() < stop_at:
            _one_cycle(client, project_id, sample if time.monotonic() >= record_from else warm)
    sample.warmup_labels = warm.labels_posted
    return sample


def _one_cycle(client: httpx.Client, project_id: int, sample: Sample) -> None:
    for _ in (0,):
        t0 = time.perf_counter()
        queue = client.get("/queue", params={"project_id": project_id, "limit": 1})
        t1 = time.perf_counter()
        sample.queue.append(t1 - t0)
        if queue.status_code != 200:
            _count_error(sample, queue)
            return
        entries = queue.json()
        if not entries:
            sample.empty_queue += 1
            time.sleep(0.01)
            return
        entry = entries[0]
        body = {
            "image_id": entry["image_id"],
            "lease_id": entry["lease_id"],
            "idempotency_key": uuid.uuid4().hex,
            "class_index": entry["rank"] % 2,
        }
        label = client.post("/labels", json=body)
        t2 = time.perf_counter()
        sample.label.append(t2 - t1)
        if label.status_code != 201:
            _count_error(sample, label)
            return
        sample.labels_posted += 1
        sample.cycle.append(t2 - t0)


@dataclass
class Run:
    samples: list[Sample]
    seconds: float  # the measured window
    server_cpu: float  # CPU seconds of the server processes during the window
    client_cpu: float  # CPU seconds of this process (the annotators) during the window


def _run_annotators(
    base_url: str, tokens: list[str], project_id: int, args: argparse.Namespace, server_pid: int
) -> Run:
    start = threading.Barrier(len(tokens) + 1)
    samples: list[Sample] = [Sample() for _ in tokens]
    began = time.monotonic() + 1.0  # the threads connect meanwhile
    window = (began + args.warmup, began + args.warmup + args.seconds)

    def run(i: int) -> None:
        samples[i] = _annotate(base_url, tokens[i], project_id, window, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tokens))]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    cpu = (_tree_cpu_seconds(server_pid), time.process_time())
    for thread in threads:
        thread.join()
    return Run(
        samples,
        time.monotonic() - window[0],
        _tree_cpu_seconds(server_pid) - cpu[0],
        time.process_time() - cpu[1],
    )


def _check_database(settings: Settings, project_id: int, overlap: int) -> dict[str, int]:
    """Items leased beyond overlap (active or done leases), images with more than ``overlap``
    reads, images one annotator read twice, and the labels in the database."""
    engine = make_engine(settings)
    with engine.connect() as conn:
        held = (
            select(Lease.queue_item_id, func.count(Lease.id).label("n"))
            .where(Lease.project_id == project_id, Lease.state.in_(("active", "done")))
            .group_by(Lease.queue_item_id)
            .subquery()
        )
        over = conn.scalar(select(func.count()).select_from(held).where(held.c.n > overlap))
        labels = conn.scalar(select(func.count(Label.id)).where(Label.project_id == project_id))
        per_image = (
            select(Label.image_id, func.count(Label.id).label("n"))
            .where(Label.project_id == project_id)
            .group_by(Label.image_id)
            .subquery()
        )
        over_read = conn.scalar(
            select(func.count()).select_from(per_image).where(per_image.c.n > overlap)
        )
        per_reader = (
            select(Label.image_id, Label.author_id, func.count(Label.id).label("n"))
            .where(Label.project_id == project_id)
            .group_by(Label.image_id, Label.author_id)
            .subquery()
        )
        reread = conn.scalar(select(func.count()).select_from(per_reader).where(per_reader.c.n > 1))
    engine.dispose()
    return {
        "double_leases": int(over or 0),
        "images_over_k_reads": int(over_read or 0),
        "images_read_twice_by_one": int(reread or 0),
        "labels_in_db": int(labels or 0),
    }


def _ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "n": 0}
    array = np.asarray(values) * 1000.0
    return {
        "p50": round(float(np.percentile(array, 50)), 2),
        "p99": round(float(np.percentile(array, 99)), 2),
        "n": len(values),
    }


def _report(
    args: argparse.Namespace, samples: list[Sample], elapsed: float, db: dict[str, int]
) -> dict[str, Any]:
    def joined(name: str) -> list[float]:
        return [value for sample in samples for value in getattr(sample, name)]

    errors: dict[str, int] = {}
    for sample in samples:
        for code, n in sample.errors.items():
            errors[code] = errors.get(code, 0) + n
    posted = sum(sample.labels_posted + sample.warmup_labels for sample in samples)
    return {
        "db": args.db,
        "annotators": args.annotators,
        "server": "coreloop serve" if args.serve else "uvicorn",
        "workers": default_workers() if args.serve else args.workers,
        "seconds": round(elapsed, 2),
        "cycles": len(joined("cycle")),
        "cycles_per_s": round(len(joined("cycle")) / elapsed, 1),
        "cycle_ms": _ms(joined("cycle")),
        "queue_ms": _ms(joined("queue")),
        "label_ms": _ms(joined("label")),
        "errors": errors,
        "empty_queue": sum(sample.empty_queue for sample in samples),
        "double_leases": db["double_leases"],
        "images_over_k_reads": db["images_over_k_reads"],
        "images_read_twice_by_one": db["images_read_twice_by_one"],
        "labels_lost": posted - db["labels_in_db"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="coreloop-load-") as tmp,
        _database_url(args.db, Path(tmp)) as url,
    ):
        data_dir = Path(tmp)
        settings = Settings(data_dir=data_dir, database_url=url)
        project_id, tokens = _populate(settings, args)
        env = {
            **os.environ,
            "CORELOOP_DATA_DIR": str(data_dir),
            "CORELOOP_DATABASE_URL": url,
            "CORELOOP_ENVIRONMENT": "development",
        }
        port = _free_port()
        with _server(env, port, args.workers, serve=args.serve) as server:
            run = _run_annotators(f"http://127.0.0.1:{port}", tokens, project_id, args, server.pid)
        report = _report(
            args, run.samples, run.seconds, _check_database(settings, project_id, args.overlap)
        )
        cycles = max(report["cycles"], 1)
        report["cpu_ms_per_cycle"] = {
            "server": round(1000 * run.server_cpu / cycles, 2),
            "client": round(1000 * run.client_cpu / cycles, 2),
        }
        report["load_average"] = round(os.getloadavg()[0], 2)
        return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured time first")
    parser.add_argument("--annotators", type=int, default=16)
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="uvicorn worker processes (default 2; on SQLite too: one writer at a time, but "
        "the HTTP and Python work of a request runs in parallel in the other process)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start the server as `coreloop serve` (the README's command: its default "
        "processes and embedded worker) instead of uvicorn with --workers",
    )
    parser.add_argument("--items", type=int, default=20_000, help="queue items to label")
    parser.add_argument("--overlap", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print(json.dumps(run(parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
