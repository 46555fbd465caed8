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


def _say(message: str) -> None:
    print(f"[coreloop demo] {message}", flush=True)


# -- data --------------------------------------------------------------------------------------


def _split_by_group(names: list[str], groups: list[str], test_fraction: float = 0.2) -> set[str]:
    """Names whose group falls in a seeded ~20% test share (groups never straddle the split)."""
    unique = sorted(set(groups))
    rng = np.random.default_rng(0)
    test_groups = set(rng.permutation(unique)[: max(1, round(len(unique) * test_fraction))])
    return {n for n, g in zip(names, groups, strict=True) if g in test_groups}


def _from_csv(images_dir: Path, csv_path: Path, masks_dir: Path | None, limit: int) -> DemoData:
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[: limit or None]
    files = [images_dir / f"{r['image_id']}.jpg" for r in rows]
    names = [f.name for f in files]
    test = _split_by_group(names, [r.get("lesion_id") or r["image_id"] for r in rows])
    data = DemoData(
        source=str(images_dir),
        classes=sorted({r["dx"] for r in rows}),
        pool=[f for f in files if f.name not in test],
        test=[f for f in files if f.name in test],
        truth={f.name: r["dx"] for f, r in zip(files, rows, strict=True)},
    )
    if masks_dir is not None:
        data.masks = {f.name: masks_dir / f"{f.stem}_segmentation.png" for f in files}
    return data


def _from_class_folders(root: Path, limit: int) -> DemoData:
    pairs = [
        (f, d.name)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.iterdir())
        if f.suffix.lower() in {".jpg", ".jpeg", ".png"}
    ][: limit or None]
    names = [f.name for f, _ in pairs]
    test = _split_by_group(names, names)
    return DemoData(
        source=str(root),
        classes=sorted({c for _, c in pairs}),
        pool=[f for f, _ in pairs if f.name not in test],
        test=[f for f, _ in pairs if f.name in test],
        truth={f.name: c for f, c in pairs},
    )


def load_demo_data(args: argparse.Namespace, settings: Settings) -> DemoData:
    """``--data DIR`` (HAM10000 layout, ISIC masks, or class folders), else synthetic lesions."""
    if args.data is None:
        from app.synthetic import write_synthetic_dataset

        root = settings.data_dir / "synthetic"
        csv_path = write_synthetic_dataset(root, n_images=args.images, size=96)
        data = _from_csv(root / "images", csv_path, root / "masks", 0)
        data.synthetic = True
        return data
    root = Path(args.data)
    candidates = (root / "HAM10000_metadata.csv", root / "metadata.csv")
    found = next((p for p in candidates if p.exists()), None)
    if found is not None:
        masks = root / "masks" if (root / "masks").is_dir() else None
        images = root / "images" if (root / "images").is_dir() else root
        return _from_csv(images, found, masks, args.limit)
    return _from_class_folders(root, args.limit)


# -- processes ---------------------------------------------------------------------------------


@contextmanager
def running_system(settings: Settings, host: str, port: int) -> Iterator[str]:
    """The API and a worker as child processes; both stopped cleanly on exit (Ctrl-C too)."""
    from worker.embedded import settings_env, start_worker, stop_worker

    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **settings_env(settings)}
    api_log = (logs / "api.log").open("ab")
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--host", host,
         "--port", str(port), "--no-access-log"],
        env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    worker_log = (logs / "worker.log").open("ab")
    worker = start_worker(settings, log_file=worker_log)
    url = f"http://{host}:{port}"
    try:
        _wait_healthy(url, api)
        _say(f"API on {url}, worker pid {worker.pid}; logs in {logs}")
        yield url
    finally:
        _say("stopping the worker and the API ...")
        stop_worker(worker)
        if api.poll() is None:
            api.send_signal(signal.SIGTERM)
            try:
                api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.kill()
        api_log.close()
        worker_log.close()


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
    from app.services.users import create_user

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


def upload_images(client: httpx.Client, project: dict[str, Any], data: DemoData) -> dict[int, str]:
    """Upload the pool (unlabeled) and the labeled test split; returns image id -> file name."""
    ids: dict[int, str] = {}
    extra = {"meta": json.dumps({"synthetic": True})} if data.synthetic else {}
    with tqdm(total=len(data.pool) + len(data.test), desc="upload", unit="img") as bar:
        for chunk in _chunks(data.pool, UPLOAD_BATCH):
            ids.update(_upload(client, project, chunk, {"split": "pool", **extra}))
            bar.update(len(chunk))
        by_class: dict[str, list[Path]] = {}
        for f in data.test:
            by_class.setdefault(data.truth[f.name], []).append(f)
        for class_name, files in by_class.items():
            label = class_name if project["task"] == "classification" else None
            form = {"split": "test", **extra, **({"label": label} if label else {})}
            for chunk in _chunks(files, UPLOAD_BATCH):
                ids.update(_upload(client, project, chunk, form))
                bar.update(len(chunk))
    return ids


def _upload(
    client: httpx.Client, project: dict[str, Any], files: list[Path], form: dict[str, str]
) -> dict[int, str]:
    parts = [("files", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
    result = _ok(client.post(f"/projects/{project['id']}/images", data=form, files=parts))
    return {item["image"]["id"]: item["filename"] for item in result["items"]}


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
    parser.add_argument("--limit", type=int, default=0, help="use at most N images of --data")
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
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
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
    except KeyboardInterrupt:
        _say("interrupted")
    _say("stopped")
    return 0


def _demo_session(
    admin: httpx.Client, url: str, tokens: dict[str, str], args: argparse.Namespace, data: DemoData
) -> None:
    project = ensure_project(admin, args, data)
    names = upload_images(admin, project, data)
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
