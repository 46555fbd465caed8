"""Load benchmark: simulated annotators leasing and labeling against the real server.

Starts uvicorn (``app.main:create_app``) on a free port of 127.0.0.1 with its data in a
temporary directory (SQLite there, or a fresh PostgreSQL database on 127.0.0.1:5432), fills
the database directly (users, a project, images, one done round of queue items), then runs
two phases against the same server:

1. **Closed loop.** N annotator threads, each with its own HTTP connection and no think time,
   doing cycles of ``GET /queue?limit=1`` + ``POST /labels`` (with the lease): a warm-up first
   (not measured), then a fixed measured time. Its throughput (cycles/s) is the server's
   capacity at N concurrent annotators; its latencies are those of a server never offered more
   than N requests at a time.
2. **Open loop** (``--rate``, cycles/s; ``--rate 0`` skips it). Arrivals on a fixed timetable,
   ``start_i = t0 + i / rate`` for ``--open-seconds`` (exponential gaps with ``--poisson``),
   whatever the server does. Each arrival is one cycle, run on the session of an annotator that
   is free (first come, first served); when all N are busy it waits for one. Its latency is
   measured from its **scheduled** start, not from when it was sent, so the time it waited for
   a free annotator (the queue building up when the server falls behind) counts: measuring
   from the send time would hide that queueing (coordinated omission). Arrivals still waiting
   ``--open-seconds`` after the timetable ends are dropped and counted as ``not_started``.

The annotators' client is ``benchmarks.lean_http`` (``--client lean``): a kept-alive socket
with httptools' parser, 64-78 µs of CPU per request here. ``--client httpx`` runs httpx
instead, 489-560 µs per request: on a machine shared with the server that CPU is taken from
the server, and most from the deployment that can use every core (PostgreSQL's API processes
and backends), while SQLite's single API process is held to one core whatever the client
leaves. Annotators on other machines cost the server nothing of the kind.

After each phase it counts in the database the items leased beyond the project's overlap, the
images read more than ``overlap`` times or twice by one annotator, and the labels lost. It
measures the CPU seconds of the server's process tree (the server, its uvicorn workers and,
with ``--serve``, the embedded worker; from ``/proc``), of the PostgreSQL server when it runs
on this machine (its postmaster, its background processes and the backends of the
benchmark's database; "n/a" on SQLite or when not visible), and of the annotators (this
process), and reports them per cycle and as the share of the machine's cores the server used.

It prints one JSON line on stdout (the closed loop's figures at the top level, the open
loop's under ``open_loop``) and a readable summary on stderr. The load average is in the
report: other work on the machine skews every figure.

    .venv/bin/python -m benchmarks.load --db sqlite --seconds 20 --annotators 16
    .venv/bin/python -m benchmarks.load --db postgresql --seconds 20 --annotators 16
    .venv/bin/python -m benchmarks.load --db sqlite --rate 200 --open-seconds 20 --poisson
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
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
from benchmarks import lean_http
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
    # Open loop only: from each arrival's scheduled start to the end of its cycle (labeled).
    from_schedule: list[float] = field(default_factory=list)
    not_started: int = 0  # open loop: arrivals dropped, still waiting long after the timetable
    # --trace: each measured request as (name, start on time.perf_counter, seconds); None: off.
    trace: list[tuple[str, float, float]] | None = None


def _read_stat(pid: int | str) -> tuple[str, list[str]] | None:
    """The command name and the fields after it (field 3 on) of ``/proc/<pid>/stat``; None if
    the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, _, tail = stat.rpartition(")")
    return head.partition("(")[2], tail.split()


def _stat_cpu_seconds(fields: list[str], children: bool = True) -> float:
    """User + system CPU time of the process, and (``children``) of its children it waited
    for (Linux)."""
    return sum(int(value) for value in fields[11 : 15 if children else 13]) / os.sysconf(
        "SC_CLK_TCK"
    )


def _processes() -> dict[int, tuple[str, list[str]]]:
    """Every live process: its command name and its ``stat`` fields."""
    processes = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _read_stat(entry.name)) is not None:
            processes[int(entry.name)] = stat
    return processes


def _tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, its live descendants (uvicorn's workers; the embedded worker and
    its pool with ``--serve``) and any other live process of its session (the server is
    started in a session of its own), each with its children it waited for."""
    processes = _processes()
    children: dict[int, list[int]] = {}
    for child, (_, fields) in processes.items():
        children.setdefault(int(fields[1]), []).append(child)
    tree: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        if current not in tree:
            tree.add(current)
            todo.extend(children.get(current, ()))
    tree |= {other for other, (_, fields) in processes.items() if int(fields[3]) == pid}
    return sum(_stat_cpu_seconds(processes[p][1]) for p in tree if p in processes)


# "postgres: [cluster: ]user database host(port) state": a client backend's process title.
_PG_BACKEND = re.compile(r"^postgres: (?:\S+: )?\S+ (\S+) (?:\[local\]|\S+\(\d+\))")


def _postgres_cpu_seconds(database: str) -> float | None:
    """CPU time of the PostgreSQL server of this machine, as far as it works for ``database``:
    the postmaster, its background processes (writers, checkpointer, autovacuum) and the live
    backends of ``database``, not those of other databases. Backends that exit in between are
    missed (the postmaster's reaped children are left out: they include other databases'),
    so a phase's figure misses connections the server opened and closed within it (beyond
    its pool of 10 per API process). None where no postgres process is visible (another
    machine, container or user)."""
    total, seen = 0.0, False
    for pid, (name, fields) in _processes().items():
        if name != "postgres":
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        title = title.strip()
        backend = _PG_BACKEND.match(title)
        if backend is None or backend.group(1) == database:
            total += _stat_cpu_seconds(fields, children=title.startswith("postgres:"))
            seen = True
    return total if seen else None


def _local_pg_database(kind: str, url: str) -> str | None:
    """The database's name where it is PostgreSQL on this machine (its CPU is measured)."""
    parsed = make_url(url)
    if kind != "postgresql" or parsed.host not in (None, "", "127.0.0.1", "localhost", "::1"):
        return None
    return parsed.database


@dataclass(frozen=True)
class Cpu:
    """A reading of the clock and of the CPU seconds used so far (db: None if unmeasured)."""

    wall: float  # time.monotonic()
    server: float
    client: float
    db: float | None


def _read_cpu(server_pid: int, pg_database: str | None) -> Cpu:
    return Cpu(
        time.monotonic(),
        _tree_cpu_seconds(server_pid),
        time.process_time(),  # this process, every thread: getrusage(RUSAGE_SELF)
        None if pg_database is None else _postgres_cpu_seconds(pg_database),
    )


def _cores() -> int:
    """The CPU cores the server may use (it inherits this process's affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


DEFAULT_UVICORN_WORKERS = 2


def _api_processes(args: argparse.Namespace) -> int:
    """The API processes the benchmark's server runs: ``--workers``, else ``coreloop serve``'s
    own choice (``--serve``) or uvicorn's default here."""
    if args.workers:
        return int(args.workers)
    return default_workers(args.db == "sqlite") if args.serve else DEFAULT_UVICORN_WORKERS


def _serve_command(port: int, workers: int | None = None) -> list[str]:
    """``coreloop serve`` as the README starts it: its default processes (or ``workers``), no
    access log, and the embedded worker (idle here)."""
    command = [sys.executable, "-m", "coreloop.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    return command if workers is None else [*command, "--workers", str(workers)]


@contextmanager
def _server(
    env: dict[str, str], port: int, workers: int | None, serve: bool = False
) -> Iterator[subprocess.Popen[bytes]]:
    """uvicorn with ``workers`` processes, or ``coreloop serve`` (``workers`` None: as the
    README starts it)."""
    command = (
        _serve_command(port, workers)
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


# The annotators' HTTP clients (--client): a connection each, the same few methods (get with
# params, post with json; responses with status_code and json()).
Client = lean_http.Client | httpx.Client
CLIENTS = ("lean", "httpx")
_TRANSPORT_ERRORS = (lean_http.TransportError, httpx.TransportError)


def _client(kind: str, base_url: str, token: str) -> Client:
    """An annotator's client: ``lean`` (benchmarks.lean_http, the default: about a seventh of
    httpx's CPU per request, which is taken from the server on a shared machine) or ``httpx``."""
    headers = {"Authorization": f"Bearer {token}"}
    if kind == "httpx":
        return httpx.Client(base_url=base_url, headers=headers, timeout=30.0)
    return lean_http.Client(base_url, headers=headers, timeout=30.0)


def _count_error(sample: Sample, response: lean_http.Response | httpx.Response) -> None:
    try:
        code = str(response.json().get("error"))
    except ValueError:
        code = f"HTTP{response.status_code}"
    sample.errors[code] = sample.errors.get(code, 0) + 1


def _annotate(
    client_kind: str,
    base_url: str,
    token: str,
    project_id: int,
    window: tuple[float, float],
    start: threading.Barrier,
    trace: bool = False,
) -> Sample:
    """One annotator: lease one item, label it with its lease, until the window ends.

    Cycles before the window opens warm the server up (connections, statement caches) and
    are not recorded.
    """
    record_from, stop_at = window
    sample, warm = Sample(trace=[] if trace else None), Sample()
    with _client(client_kind, base_url, token) as client:
        start.wait()
        while time.monotonic() < stop_at:
            _safe_cycle(client, project_id, sample if time.monotonic() >= record_from else warm)
    sample.warmup_labels = warm.labels_posted
    return sample


def _safe_cycle(client: Client, project_id: int, sample: Sample) -> None:
    """One cycle; a transport error (the server dropped the connection, or is gone) counts
    as an error of its type instead of ending the annotator's thread."""
    try:
        _one_cycle(client, project_id, sample)
    except _TRANSPORT_ERRORS as exc:
        code = type(exc.__cause__ or exc).__name__
        sample.errors[code] = sample.errors.get(code, 0) + 1
        time.sleep(0.01)


def _one_cycle(client: Client, project_id: int, sample: Sample) -> None:
    for _ in (0,):
        t0 = time.perf_counter()
        queue = client.get("/queue", params={"project_id": project_id, "limit": 1})
        t1 = time.perf_counter()
        sample.queue.append(t1 - t0)
        if sample.trace is not None:
            sample.trace.append(("GET /queue", t0, t1 - t0))
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
        if sample.trace is not None:
            sample.trace.append(("POST /labels", t1, t2 - t1))
        if label.status_code != 201:
            _count_error(sample, label)
            return
        sample.labels_posted += 1
        sample.cycle.append(t2 - t0)


@dataclass
class Run:
    samples: list[Sample]
    seconds: float  # the measured window
    cpu: tuple[Cpu, Cpu]  # readings at the start and at the end of the window

    @property
    def server_cpu(self) -> float:
        """CPU seconds of the server processes during the window."""
        return self.cpu[1].server - self.cpu[0].server

    @property
    def client_cpu(self) -> float:
        """CPU seconds of this process (the annotators) during the window."""
        return self.cpu[1].client - self.cpu[0].client

    @property
    def db_cpu(self) -> float | None:
        """CPU seconds of the local PostgreSQL server during the window; None if unmeasured, or
        when backends that exited in the window make the sum go down (it misses them, so the
        figure would be meaningless)."""
        start, end = self.cpu[0].db, self.cpu[1].db
        if start is None or end is None or end < start:
            return None
        return end - start


def _run_annotators(
    base_url: str,
    tokens: list[str],
    project_id: int,
    args: argparse.Namespace,
    read_cpu: Callable[[], Cpu],
) -> Run:
    start = threading.Barrier(len(tokens) + 1)
    samples: list[Sample] = [Sample() for _ in tokens]
    began = time.monotonic() + 1.0  # the threads connect meanwhile
    window = (began + args.warmup, began + args.warmup + args.seconds)

    def run(i: int) -> None:
        samples[i] = _annotate(
            args.client, base_url, tokens[i], project_id, window, start, args.trace is not None
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tokens))]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    cpu = read_cpu()
    for thread in threads:
        thread.join()
    end = read_cpu()
    return Run(samples, end.wall - window[0], (cpu, end))


def _arrival_offsets(rate: float, seconds: float, poisson: bool, seed: int = 0) -> list[float]:
    """Scheduled starts (seconds after t0) of the open loop's arrivals in ``[0, seconds)``:
    ``i / rate``, or a Poisson process of that rate (exponential gaps, the first at 0)."""
    if not poisson:
        return [i / rate for i in range(int(np.ceil(rate * seconds - 1e-9)))]
    rng = np.random.default_rng(seed)
    offsets, t = [], 0.0
    while t < seconds:
        offsets.append(t)
        t += float(rng.exponential(1.0 / rate))
    return offsets


def _run_open_loop(
    base_url: str,
    tokens: list[str],
    project_id: int,
    args: argparse.Namespace,
    read_cpu: Callable[[], Cpu],
) -> Run:
    """Arrivals at ``args.rate`` per second on a timetable fixed in advance, each one cycle on
    the session of the first annotator free (first come, first served), whether or not the
    server keeps up. ``Sample.from_schedule`` holds the latency from the *scheduled* start
    (including any wait for a free annotator: no coordinated omission); ``Sample.cycle`` the
    cycle's own time from its first request. Arrivals not started ``args.open_seconds`` after
    the timetable's end are dropped (``not_started``). The window runs from t0 to the last
    cycle's end."""
    offsets = _arrival_offsets(args.rate, args.open_seconds, args.poisson, args.seed)
    samples = [Sample(trace=None if args.trace is None else []) for _ in tokens]
    ready = threading.Barrier(len(tokens) + 1)
    go = threading.Event()
    t0 = [0.0]  # perf_counter() of the first arrival, set before ``go``
    lock = threading.Lock()
    arrivals = iter(range(len(offsets)))

    def run(i: int) -> None:
        sample = samples[i]
        with _client(args.client, base_url, tokens[i]) as client:
            with suppress(*_TRANSPORT_ERRORS):  # else the first arrival connects
                client.get("/health")  # connected before the clock starts
            ready.wait()
            go.wait()
            drop_after = t0[0] + 2 * args.open_seconds
            while True:
                with lock:
                    arrival = next(arrivals, None)
                if arrival is None:
                    return
                scheduled = t0[0] + offsets[arrival]
                now = time.perf_counter()
                if now < scheduled:
                    time.sleep(scheduled - now)
                elif now > drop_after:
                    sample.not_started += 1
                    continue
                before = sample.labels_posted
                _safe_cycle(client, project_id, sample)
                if sample.labels_posted > before:
                    sample.from_schedule.append(time.perf_counter() - scheduled)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(tokens))]
    for thread in threads:
        thread.start()
    ready.wait()
    cpu = read_cpu()
    t0[0] = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join()
    end = read_cpu()
    return Run(samples, end.wall - cpu.wall, (cpu, end))


@contextmanager
def _without_gc_pauses() -> Iterator[None]:
    """No garbage collection in this (the client's) process while a phase runs: its pauses
    (up to 132 ms seen for a full collection, with 32 annotator threads waiting) would count
    as the server's latency. What a phase allocates is freed by reference counting; the
    cycles it leaves wait for the collection at its end."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()
        gc.collect()


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


def _ms(values: list[float], percentiles: tuple[int, ...] = (50, 99)) -> dict[str, float]:
    if not values:
        return {**{f"p{q}": float("nan") for q in percentiles}, "n": 0}
    array = np.asarray(values) * 1000.0
    return {
        **{f"p{q}": round(float(np.percentile(array, q)), 2) for q in percentiles},
        "n": len(values),
    }


def _latency_ms(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds, and the count."""
    report = _ms(values, (50, 90, 99))
    n = report.pop("n")
    report["max"] = round(1000.0 * max(values), 2) if values else float("nan")
    report["n"] = n
    return report


def _cpu_report(run: Run, cycles: int) -> dict[str, Any]:
    """CPU milliseconds per cycle, and the share of the cores used, during ``run``'s window:
    of the server's processes, of the local PostgreSQL server ("n/a" where not measured)
    and of the annotators (this process)."""
    per_cycle, seconds, cores = max(cycles, 1), max(run.seconds, 1e-9), _cores()
    db = run.db_cpu
    return {
        "cpu_ms_per_cycle": {
            "server": round(1000 * run.server_cpu / per_cycle, 2),
            "client": round(1000 * run.client_cpu / per_cycle, 2),
            "db": "n/a" if db is None else round(1000 * db / per_cycle, 2),
        },
        "cpu_share_of_cores": {
            "cores": cores,
            "server": round(run.server_cpu / seconds / cores, 3),
            "client": round(run.client_cpu / seconds / cores, 3),
            "db": "n/a" if db is None else round(db / seconds / cores, 3),
        },
    }


def _errors(samples: list[Sample]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for sample in samples:
        for code, n in sample.errors.items():
            errors[code] = errors.get(code, 0) + n
    return errors


_NO_ROWS = {
    "double_leases": 0,
    "images_over_k_reads": 0,
    "images_read_twice_by_one": 0,
    "labels_in_db": 0,
}


def _phase_figures(
    samples: list[Sample], posted: int, before: dict[str, int], after: dict[str, int]
) -> dict[str, Any]:
    """What both loops report: the latency of each call, the errors, and the checks, counted
    on what the database gained during the phase (``before`` to ``after``)."""

    def gained(key: str) -> int:
        return after[key] - before[key]

    return {
        "queue_ms": _ms(_joined(samples, "queue")),
        "label_ms": _ms(_joined(samples, "label")),
        "errors": _errors(samples),
        "empty_queue": sum(sample.empty_queue for sample in samples),
        "double_leases": gained("double_leases"),
        "images_over_k_reads": gained("images_over_k_reads"),
        "images_read_twice_by_one": gained("images_read_twice_by_one"),
        "labels_lost": posted - gained("labels_in_db"),
    }


def _joined(samples: list[Sample], name: str) -> list[float]:
    return [value for sample in samples for value in getattr(sample, name)]


def _report(
    args: argparse.Namespace, samples: list[Sample], elapsed: float, db: dict[str, int]
) -> dict[str, Any]:
    cycles = _joined(samples, "cycle")
    posted = sum(sample.labels_posted + sample.warmup_labels for sample in samples)
    return {
        "db": args.db,
        "annotators": args.annotators,
        "server": "coreloop serve" if args.serve else "uvicorn",
        "workers": _api_processes(args),
        "client": args.client,
        "seconds": round(elapsed, 2),
        "cycles": len(cycles),
        "cycles_per_s": round(len(cycles) / elapsed, 1),
        "cycle_ms": _ms(cycles),
        **_phase_figures(samples, posted, _NO_ROWS, db),
    }


def _open_report(
    args: argparse.Namespace, run: Run, before: dict[str, int], after: dict[str, int]
) -> dict[str, Any]:
    """The open loop's figures; its checks count what the database gained during it."""
    cycles = len(_joined(run.samples, "from_schedule"))
    posted = sum(sample.labels_posted for sample in run.samples)
    return {
        "offered_per_s": args.rate,
        "schedule": "poisson" if args.poisson else "fixed",
        "timetable_s": args.open_seconds,
        "seconds": round(run.seconds, 2),
        "scheduled": len(_arrival_offsets(args.rate, args.open_seconds, args.poisson, args.seed)),
        "cycles": cycles,
        "achieved_per_s": round(cycles / max(args.open_seconds, run.seconds), 1),
        "latency_ms": _latency_ms(_joined(run.samples, "from_schedule")),
        "service_ms": _ms(_joined(run.samples, "cycle")),
        "not_started": sum(sample.not_started for sample in run.samples),
        **_phase_figures(run.samples, posted, before, after),
        **_cpu_report(run, cycles),
    }


def _summary(report: dict[str, Any]) -> str:
    """The report in a few readable lines."""

    def checks(r: dict[str, Any]) -> str:
        return (
            f"  checks: errors {sum(r['errors'].values())}{' ' if r['errors'] else ''}"
            f"{r['errors'] or ''}, "
            f"empty queue {r['empty_queue']}, double hand-outs {r['double_leases']}, "
            f"images over k reads {r['images_over_k_reads']}, read twice by one "
            f"{r['images_read_twice_by_one']}, labels lost {r['labels_lost']}"
        )

    def cpu(r: dict[str, Any]) -> str:
        ms, share = r["cpu_ms_per_cycle"], r["cpu_share_of_cores"]

        def pct(value: Any) -> str:
            return value if isinstance(value, str) else f"{100 * value:.0f}%"

        return (
            f"  CPU ms per cycle: server {ms['server']}, db {ms['db']}, client {ms['client']}; "
            f"share of the {share['cores']} cores: server {pct(share['server'])}, "
            f"db {pct(share['db'])}, client {pct(share['client'])}"
        )

    r = report
    lines = [
        f"closed loop: {r['annotators']} annotators ({r['client']} client), {r['server']} "
        f"({r['workers']} API processes), {r['db']}, {r['seconds']} s: {r['cycles_per_s']} "
        f"cycles/s ({r['cycles']} cycles), "
        f"cycle p50 {r['cycle_ms']['p50']} ms, p99 {r['cycle_ms']['p99']} ms",
        checks(r),
        cpu(r),
    ]
    o = r["open_loop"]
    if o is None:
        lines.append("open loop: skipped (--rate 0)")
    else:
        lat = o["latency_ms"]
        lines += [
            f"open loop: offered {o['offered_per_s']}/s ({o['schedule']}, {o['scheduled']} "
            f"arrivals in {o['timetable_s']} s), achieved {o['achieved_per_s']}/s "
            f"({o['cycles']} cycles in {o['seconds']} s, {o['not_started']} not started)",
            f"  latency from the scheduled start: p50 {lat['p50']}, p90 {lat['p90']}, "
            f"p99 {lat['p99']}, max {lat['max']} ms; service (from the send) p50 "
            f"{o['service_ms']['p50']}, p99 {o['service_ms']['p99']} ms",
            checks(o),
            cpu(o),
        ]
    lines.append(f"load average {r['load_average']}")
    return "\n".join(lines)


def _write_trace(path: Path, phases: dict[str, Run | None]) -> int:
    """``--trace``: one JSON line per measured request, in order of its start; returns how many.
    ``start`` is ``time.perf_counter()`` in seconds: CLOCK_MONOTONIC on Linux, the clock whose
    milliseconds ``perf trace -T`` prints, so a server's system calls can be laid beside it."""
    rows = sorted(
        (start, phase, name, secs)
        for phase, ran in phases.items()
        if ran is not None
        for sample in ran.samples
        for name, start, secs in sample.trace or ()
    )
    with path.open("w") as out:
        for start, phase, name, secs in rows:
            row = {"phase": phase, "request": name, "start": round(start, 6)}
            out.write(json.dumps({**row, "ms": round(1000 * secs, 3)}) + "\n")
    return len(rows)


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
        base_url = f"http://127.0.0.1:{port}"
        workers = args.workers if args.serve else _api_processes(args)
        with _server(env, port, workers, serve=args.serve) as server:
            read_cpu = functools.partial(_read_cpu, server.pid, _local_pg_database(args.db, url))
            with _without_gc_pauses():
                closed = _run_annotators(base_url, tokens, project_id, args, read_cpu)
            db_closed = _check_database(settings, project_id, args.overlap)
            opened, db_opened = None, db_closed
            if args.rate > 0:
                with _without_gc_pauses():
                    opened = _run_open_loop(base_url, tokens, project_id, args, read_cpu)
                db_opened = _check_database(settings, project_id, args.overlap)
        report = _report(args, closed.samples, closed.seconds, db_closed)
        report.update(_cpu_report(closed, report["cycles"]))
        report["open_loop"] = (
            None if opened is None else _open_report(args, opened, db_closed, db_opened)
        )
        report["load_average"] = round(os.getloadavg()[0], 2)
        if args.trace is not None:
            report["traced_requests"] = _write_trace(args.trace, {"closed": closed, "open": opened})
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
        default=None,
        help=f"API processes: uvicorn's --workers (default {DEFAULT_UVICORN_WORKERS}), or with "
        "--serve `coreloop serve --workers N` (default: its own choice)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start the server as `coreloop serve` (the README's command: its default "
        "processes and embedded worker) instead of uvicorn with --workers",
    )
    parser.add_argument(
        "--client",
        choices=CLIENTS,
        default="lean",
        help="the annotators' HTTP client: lean (benchmarks.lean_http, default) or httpx "
        "(about seven times the CPU per request, taken from the server on this machine)",
    )
    parser.add_argument("--items", type=int, default=20_000, help="queue items to label")
    parser.add_argument("--overlap", type=int, default=1)
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="open loop after the closed one: offered cycles/s (default 100; 0 skips it)",
    )
    parser.add_argument(
        "--open-seconds", type=float, default=10.0, help="the open loop's timetable (default 10)"
    )
    parser.add_argument(
        "--poisson",
        action="store_true",
        help="open loop: Poisson arrivals (exponential gaps) instead of one every 1/rate s",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        help="write each measured request (its phase, start on time.perf_counter, i.e. "
        "CLOCK_MONOTONIC as `perf trace -T` prints it, and duration) to this file, one JSON "
        "line each",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the Poisson arrivals")
    args = parser.parse_args(argv)
    if args.rate < 0 or args.open_seconds <= 0:
        parser.error("--rate must be >= 0 and --open-seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    report = run(parse_args(argv))
    print(json.dumps(report), flush=True)
    print(_summary(report), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
