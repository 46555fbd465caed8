"""``coreloop demo``: the whole system on one machine, in minutes, with nothing but Python.

It starts the API (uvicorn, a child process) and a Celery worker (a child process, over the
embedded SQLite broker), creates a project, uploads images over HTTP, runs round 0 and prints
the URLs and tokens. ``--simulate`` adds an oracle annotator that answers the queue from the
ground truth, so rounds, the queue and the learning curve move without a human.

The demo is an ordinary HTTP client of the server: what it does, a user's script can do.
A second run reuses the data directory (its project, images and tokens).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from app.errors import InvalidInput
from app.images.importer import (
    HAM10000_CSV,
    IMAGE_SUFFIXES,
    ImportEntry,
    ImportOptions,
    list_entries,
)
from app.settings import Settings, get_settings

UPLOAD_BATCH = 50


@dataclass
class DemoData:
    """Files to upload and the ground truth the oracle answers from."""

    source: str
    classes: list[str]
    pool: list[Path]
    test: list[Path]
    truth: dict[str, str] = field(default_factory=dict)  # file name -> class name
    masks: dict[str, Path] = field(default_factory=dict)  # file name -> mask file
    synthetic: bool = False
    names: dict[Path, str] = field(default_factory=dict)  # upload name, when not the file name

    def name_of(self, path: Path) -> str:
        """The name ``path`` is uploaded under (the key of ``truth`` and ``masks``)."""
        return self.names.get(path, path.name)


def _say(message: str) -> None:
    print(f"[coreloop demo] {message}", flush=True)


# -- data --------------------------------------------------------------------------------------

TEST_FRACTION = 0.2
MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")
EXPECTED = (
    "the demo expects a HAM10000 layout (HAM10000_metadata.csv and <image_id>.jpg in images/ or "
    "beside it), one subfolder of images per class (at least 2 classes), or, with --task "
    "segmentation, images with <name>_segmentation.png masks (in masks/ or beside them); images "
    "may be " + " ".join(sorted(IMAGE_SUFFIXES))
)


class DemoDataUnusable(InvalidInput):
    """``--data`` names a folder the demo cannot use (the CLI prints one line, exit code 2)."""

    code = "DemoDataUnusable"


def _has_ham_columns(csv_path: Path) -> bool:
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return {"image_id", "dx"} <= set(header)


def _layout_of(root: Path, task: str) -> tuple[Path, ImportOptions]:
    """The importer layout of ``--data DIR``: its image folder and options."""
    if not root.is_dir():
        raise DemoDataUnusable(f"--data {root} is not a folder; {EXPECTED}.")
    images = root / "images" if (root / "images").is_dir() else root
    masks = next((root / d for d in MASK_DIRS if (root / d).is_dir()), None)
    # HAM10000's own metadata file; or a ``metadata.csv`` with its columns (the synthetic set's).
    for name in (HAM10000_CSV, "metadata.csv"):
        csv_path = root / name
        if csv_path.is_file() and (name == HAM10000_CSV or _has_ham_columns(csv_path)):
            return images, ImportOptions(layout="ham10000", csv_path=csv_path, masks_dir=masks)
    if task == "segmentation":
        return images, ImportOptions(layout="isic", masks_dir=masks)
    return root, ImportOptions(layout="folders")


def _upload_names(paths: list[Path]) -> dict[Path, str]:
    """The file name, or ``<folder>_<name>`` for names that occur in more than one folder."""
    seen: dict[str, int] = {}
    for path in paths:
        seen[path.name] = seen.get(path.name, 0) + 1
    return {p: p.name if seen[p.name] == 1 else f"{p.parent.name}_{p.name}" for p in paths}


def demo_data_from_entries(
    root: Path, entries: list[ImportEntry], task: str, layout: str, limit: int = 0
) -> DemoData:
    """The demo's data from importer entries: ``limit`` images (whole lesions, stratified by
    class) and a lesion-grouped, class-stratified test split (``ml.ham10000``, as simulate)."""
    listed = len(entries)
    entries = [e for e in entries if e.path.is_file()]
    if not entries:
        where = f" ({listed} listed in its CSV, none found)" if listed else ""
        raise DemoDataUnusable(
            f"--data {root}: no images in the {layout} layout{where}; {EXPECTED}."
        )
    if len(entries) < listed:
        _say(f"skipping {listed - len(entries)} rows of the CSV whose image file is missing")
    if task == "segmentation":
        entries = [e for e in entries if e.mask_path is not None and e.mask_path.is_file()]
        if not entries:
            raise DemoDataUnusable(f"--data {root}: no image has a mask; {EXPECTED}.")
    else:
        classes = sorted({e.class_name for e in entries if e.class_name})
        if len(classes) < 2 or any(e.class_name is None for e in entries):
            raise DemoDataUnusable(
                f"--data {root}: a classification demo needs at least 2 classes, found "
                f"{len(entries)} images in {layout} layout with classes {classes}; {EXPECTED}."
            )
    from ml.ham10000 import lesion_split, stratified_lesion_rows  # torch: only when asked for

    groups = np.array([str(e.meta.get("lesion_id") or e.path) for e in entries])
    labels = np.array([e.class_name or "" for e in entries])
    if limit and limit < len(entries):
        rows = stratified_lesion_rows(groups, labels, limit)
        entries, groups, labels = [entries[i] for i in rows], groups[rows], labels[rows]
    pool, test = lesion_split(groups, TEST_FRACTION, seed=0, strata=labels)
    names = _upload_names([e.path for e in entries])
    data = DemoData(
        source=str(root),
        classes=sorted(set(labels.tolist()) - {""}),
        pool=[entries[i].path for i in pool],
        test=[entries[i].path for i in test],
        names=names,
    )
    for e in entries:
        data.truth[names[e.path]] = e.class_name or ""
        if task == "segmentation" and e.mask_path is not None:
            data.masks[names[e.path]] = e.mask_path
    return data


def load_demo_data(args: argparse.Namespace, settings: Settings) -> DemoData:
    """``--data DIR`` through the importer's layouts (ham10000, isic, folders), else synthetic
    lesions; a folder the demo cannot use raises :class:`DemoDataUnusable`."""
    if args.data is None:
        from coreloop.synthetic import write_synthetic_dataset

        root = settings.data_dir / "synthetic"
        csv_path = write_synthetic_dataset(root, n_images=args.images, size=96)
        options = ImportOptions(layout="ham10000", csv_path=csv_path, masks_dir=root / "masks")
        entries = list_entries(root / "images", options)
        data = demo_data_from_entries(root, entries, args.task, "ham10000")
        data.synthetic = True
        return data
    root = Path(args.data).expanduser()
    images, options = _layout_of(root, args.task)
    entries = list_entries(images, options)
    return demo_data_from_entries(root, entries, args.task, options.layout, args.limit)


# -- processes ---------------------------------------------------------------------------------


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stopping_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP (``timeout``, docker, systemd, a closed terminal) stop the demo as
    Ctrl-C does, so the children are stopped too (they run in their own sessions and never see
    a signal sent to the demo's process group)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP ignored (the clean-up must not be interrupted half-way)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *TERMINATING_SIGNALS)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def running_system(settings: Settings, host: str, port: int) -> Iterator[str]:
    """The API and a worker as child processes; both stopped cleanly on exit (Ctrl-C and, within
    :func:`stopping_on_termination`, SIGTERM too)."""
    from worker.embedded import settings_env, start_worker, stop_worker

    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings)}
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    with (logs / "api.log").open("ab") as api_log, (logs / "worker.log").open("ab") as worker_log:
        try:
            api = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host",
                 host, "--port", str(port), "--no-access-log"],
                env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            worker = start_worker(settings, log_file=worker_log)
            url = f"http://{host}:{port}"
            _wait_healthy(url, api)
            _say(f"API on {url} (pid {api.pid}), worker pid {worker.pid}; logs in {logs}")
            yield url
        finally:
            with _signals_held():
                _say("stopping the worker and the API ...")
                _stop_children(api, worker, stop_worker)


def _stop_children(
    api: subprocess.Popen[bytes] | None,
    worker: subprocess.Popen[bytes] | None,
    stop_worker: Callable[[subprocess.Popen[bytes]], int],
) -> None:
    """SIGTERM to both (the API first, so they shut down together), then wait; SIGKILL late ones."""
    if api is not None and api.poll() is None:
        api.send_signal(signal.SIGTERM)
    if worker is not None:
        stop_worker(worker)
    if api is not None:
        try:
            api.wait(timeout=10)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


def _wait_healthy(url: str, api: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise RuntimeError(f"the API exited with status {api.returncode}; see its log")
        try:
            if httpx.get(f"{url}/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API did not become ready within {timeout:.0f} s")


# -- users, project, images --------------------------------------------------------------------


def ensure_tokens(settings: Settings) -> dict[str, str]:
    """Admin and annotator tokens, created once and kept in ``<data_dir>/demo-tokens.json``."""
    path = settings.data_dir / "demo-tokens.json"
    if path.exists():
        tokens: dict[str, str] = json.loads(path.read_text())
        return tokens
    from app.db import make_engine, make_sessionmaker, unit_of_work
    from app.migrate import upgrade
    from app.models import Role
    from app.users.service import create_user

    engine = make_engine(settings)
    upgrade(engine)
    suffix = os.urandom(3).hex()
    with unit_of_work(make_sessionmaker(engine)) as session:
        _, admin = create_user(session, f"demo-admin-{suffix}", Role.admin)
        _, annotator = create_user(session, f"demo-annotator-{suffix}", Role.annotator)
    engine.dispose()
    tokens = {"admin": admin, "annotator": annotator}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tokens))
    tmp.chmod(0o600)
    tmp.replace(path)
    return tokens


def ensure_project(
    client: httpx.Client, args: argparse.Namespace, data: DemoData
) -> dict[str, Any]:
    body = {
        "name": args.project or f"demo-{args.task}",
        "task": args.task,
        "classes": data.classes if args.task == "classification" else ["lesion"],
        "budget": args.budget,
        "initial_fraction": 0.1,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": 16,
        "warm_start": args.warm_start,
    }
    return find_or_create_project(client, body)


def find_or_create_project(
    client: httpx.Client, body: dict[str, Any], say: Callable[[str], None] = _say
) -> dict[str, Any]:
    """The project named ``body["name"]``; created from ``body`` when there is none."""
    name = body["name"]
    for project in _ok(client.get("/projects")):
        if project["name"] == name:
            say(f"reusing project {name!r} (id {project['id']})")
            return dict(project)
    created: dict[str, Any] = _ok(client.post("/projects", json=body))
    say(f"created project {name!r} (id {created['id']}, {body['task']}, classes "
        f"{body['classes']}, budget {body['budget']} per round)")  # fmt: skip
    return created


def ensure_member(admin: httpx.Client, project_id: int, token: str) -> None:
    """Make the user of ``token`` an annotator of the project (annotators reach only the
    projects they are members of); nothing to do when they already are."""
    me = _ok(admin.get("/users/me", headers={"Authorization": f"Bearer {token}"}))
    response = admin.post(
        f"/projects/{project_id}/members", json={"user_id": me["id"], "role": "annotator"}
    )
    if response.status_code != 409:  # 409 MemberExists: a rerun of the demo
        _ok(response)


def upload_images(client: httpx.Client, project: dict[str, Any], data: DemoData) -> dict[int, str]:
    """Upload the pool (unlabeled) and the labeled test split; returns image id -> file name."""
    ids: dict[int, str] = {}
    extra = {"meta": json.dumps({"synthetic": True})} if data.synthetic else {}
    with tqdm(total=len(data.pool) + len(data.test), desc="upload", unit="img") as bar:
        for chunk in _chunks(data.pool, UPLOAD_BATCH):
            ids.update(_upload(client, project, data, chunk, {"split": "pool", **extra}))
            bar.update(len(chunk))
        by_class: dict[str, list[Path]] = {}
        for f in data.test:
            by_class.setdefault(data.truth[data.name_of(f)], []).append(f)
        for class_name, files in by_class.items():
            label = class_name if project["task"] == "classification" else None
            form = {"split": "test", **extra, **({"label": label} if label else {})}
            for chunk in _chunks(files, UPLOAD_BATCH):
                ids.update(_upload(client, project, data, chunk, form))
                bar.update(len(chunk))
    return ids


def _upload(
    client: httpx.Client,
    project: dict[str, Any],
    data: DemoData,
    files: list[Path],
    form: dict[str, str],
) -> dict[int, str]:
    names = [data.name_of(f) for f in files]
    parts = [
        ("files", (n, f.read_bytes(), "application/octet-stream"))
        for n, f in zip(names, files, strict=True)
    ]
    result = _ok(client.post(f"/projects/{project['id']}/images", data=form, files=parts))
    return {item["image"]["id"]: n for item, n in zip(result["items"], names, strict=True)}


def label_test_masks(
    client: httpx.Client, project: dict[str, Any], data: DemoData, names: dict[int, str]
) -> int:
    """Segmentation: the test split's masks as labels, so each round reports Jaccard and Dice
    (a classification test split is uploaded with its classes). Idempotent across runs."""
    if project["task"] != "segmentation":
        return 0
    test = {data.name_of(f) for f in data.test}
    todo = [(image_id, name) for image_id, name in sorted(names.items()) if name in test]
    for image_id, name in tqdm(todo, desc="test masks", unit="img"):
        post_oracle_label(client, project, data, image_id, name, f"demo-test:{image_id}")
    return len(todo)


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text}")  # fmt: skip
    return response.json()


# -- rounds and the oracle ---------------------------------------------------------------------


def run_round(
    client: httpx.Client,
    project_id: int,
    timeout: float = 3600.0,
    say: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Trigger a round (or join the active one) and follow it to its end."""
    response = client.post("/rounds", json={"project_id": project_id})
    if response.status_code == 409:
        rounds = _ok(client.get("/rounds", params={"project_id": project_id}))
        current = max(rounds, key=lambda r: r["number"])
    else:
        current = _ok(response)
    say(f"round {current['number']} queued (id {current['id']})")
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        current = _ok(client.get(f"/rounds/{current['id']}"))
        line = f"round {current['number']}: {current['status']} {_progress(current)}".rstrip()
        if line != last:
            say(line)
            last = line
        if current["status"] in ("done", "failed", "cancelled"):
            return dict(current)
        time.sleep(0.5)
    raise RuntimeError(f"round {current['id']} did not finish within {timeout:.0f} s")


def _progress(round_: dict[str, Any]) -> str:
    progress = round_.get("progress") or {}
    if "epoch" in progress and round_["status"] == "training":
        return f"(epoch {progress['epoch']} of {progress.get('epochs', '?')})"
    if "scored" in progress and round_["status"] == "scoring":
        return f"(scored {progress['scored']} of {progress.get('total', '?')})"
    return ""


def oracle_label_batch(
    client: httpx.Client, project: dict[str, Any], data: DemoData, names: dict[int, str]
) -> int:
    """Label everything the queue offers, from the ground truth, as an annotator would."""
    done = 0
    while True:
        items = _ok(client.get("/queue", params={"project_id": project["id"], "limit": 20}))
        if not items:
            return done
        for item in items:
            post_oracle_label(client, project, data, item["image_id"], names[item["image_id"]],
                              f"demo-oracle:{item['lease_id']}", item["lease_id"])  # fmt: skip
            done += 1


def post_oracle_label(
    client: httpx.Client,
    project: dict[str, Any],
    data: DemoData,
    image_id: int,
    name: str,
    key: str,
    lease_id: int | None = None,
) -> None:
    """``POST /labels`` with the ground truth of file ``name``: its class, or its mask."""
    lease = {} if lease_id is None else {"lease_id": lease_id}
    if project["task"] == "classification":
        body = {"image_id": image_id, "idempotency_key": key, **lease,
                "class_index": project["classes"].index(data.truth[name])}  # fmt: skip
        _ok(client.post("/labels", json=body))
        return
    mask = np.array(Image.open(data.masks[name]).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(((mask > 127) * 255).astype(np.uint8)).save(buf, format="PNG")
    form = {"image_id": str(image_id), "idempotency_key": key,
            **{k: str(v) for k, v in lease.items()}}  # fmt: skip
    files = {"mask": ("mask.png", buf.getvalue(), "image/png")}
    _ok(client.post("/labels", data=form, files=files))


def _metric_line(round_: dict[str, Any]) -> str:
    test = (round_.get("metrics") or {}).get("test") or {}
    shown = {k: round(v, 3) for k, v in test.items() if isinstance(v, float)}
    labeled = round_.get("labeled_count")
    return f"round {round_['number']} {round_['status']}: labels {labeled}, test {shown or 'n/a'}"


# -- the command -------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", help="HAM10000 layout, ISIC layout or class folders (default: synthetic)"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=0,
        help="use at most N images of --data (whole lesions, by class)",
    )
    parser.add_argument("--images", type=int, default=300, help="synthetic images to generate")
    parser.add_argument(
        "--task", choices=["classification", "segmentation"], default="classification"
    )
    parser.add_argument("--project", help="project name (default demo-<task>)")
    parser.add_argument(
        "--simulate", action="store_true", help="oracle annotators label each batch"
    )
    parser.add_argument("--rounds", type=int, default=3, help="simulated rounds after round 0")
    parser.add_argument("--exit", action="store_true", help="stop when done instead of serving")
    parser.add_argument("--budget", type=int, default=24, help="images per round")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument(
        "--warm-start",
        action="store_true",
        help="pretrain the backbone on the pool first (SimCLR; minutes on a CPU)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    with stopping_on_termination():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    broker = (settings.broker_url or "?").split("://")[0]
    database = settings.db_url.split("://")[0]
    _say(f"data directory {settings.data_dir} (database {database}, broker {broker})")
    data = load_demo_data(args, settings)
    if data.synthetic:
        _say(f"SYNTHETIC images ({len(data.pool) + len(data.test)}) for trying the software, "
             "not medical data; pass --data DIR for real images")  # fmt: skip
    tokens = ensure_tokens(settings)
    try:
        with running_system(settings, args.host, args.port) as url:
            headers = {"Authorization": f"Bearer {tokens['admin']}"}
            with httpx.Client(base_url=url, headers=headers, timeout=60.0) as admin:
                _demo_session(admin, url, tokens, args, data)
                if not args.exit:
                    _say("serving; press Ctrl-C to stop")
                    while True:
                        time.sleep(3600)
    except KeyboardInterrupt as exc:
        _say(f"interrupted ({exc or 'Ctrl-C'})")
    except RuntimeError as exc:  # a refused request, a failed round: one line, no traceback
        _say(f"error: {exc}")
        return 1
    _say("stopped")
    return 0


def _demo_session(
    admin: httpx.Client, url: str, tokens: dict[str, str], args: argparse.Namespace, data: DemoData
) -> None:
    project = ensure_project(admin, args, data)
    ensure_member(admin, project["id"], tokens["annotator"])
    names = upload_images(admin, project, data)
    if tested := label_test_masks(admin, project, data, names):
        _say(f"labeled the {tested} test images with their masks")
    rounds = _ok(admin.get("/rounds", params={"project_id": project["id"]}))
    if not any(r["status"] == "done" for r in rounds):
        _say(_metric_line(run_round(admin, project["id"])))
    _say(f"annotator page: {url}/ui  (sign in with a token below)")
    _say(f"annotator token: {tokens['annotator']}")
    _say(f"admin token:     {tokens['admin']}")
    _say(f"queue: GET {url}/queue?project_id={project['id']}  (API docs: {url}/docs)")
    if not args.simulate:
        return
    annotator = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {tokens['annotator']}"}, timeout=60.0
    )
    with annotator:
        for _ in range(args.rounds):
            labeled = oracle_label_batch(annotator, project, data, names)
            _say(f"oracle labeled {labeled} images")
            finished = run_round(admin, project["id"])
            _say(_metric_line(finished))
            if finished["status"] != "done":
                raise RuntimeError(
                    f"round {finished['number']} {finished['status']}: {finished.get('error')}"
                )
