"""A real Label Studio (1.23.2) and a real coreloop API, each a subprocess, for interop tests.

Label Studio lives in its own venv (``scripts/setup_label_studio.sh``; ``CORELOOP_LS_VENV``,
default ``.ls-venv``); without it these tests skip. Recipe: shared/design/ENVIRONMENT.md
("A real Label Studio as a test peer"). A data dir is initialised once (``label-studio init``
with a fixed user token; minutes on this machine) and cached inside the LS venv; each test
starts Label Studio on a copy. The project's venv never imports ``label_studio_sdk``: a
driver script runs in the LS venv and takes JSON commands on stdin (one process per session,
since importing the SDK takes seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.migrate import upgrade
from app.models import Role, User
from app.security import hash_token, new_token
from app.settings import Settings
from app.storage import Storage
from tests.membership import grant_all

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("CORELOOP_LS_VENV") or REPO / ".ls-venv").resolve()
LS_EMAIL, LS_PASSWORD = "admin@example.com", "pass12345"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"  # 40 hex: a legacy API token
LS_ENV_UNSET = ("HOST", "PORT", "USERNAME", "PASSWORD", "DEBUG")
LS_ENV = {
    "LATEST_VERSION_CHECK": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "COLLECT_ANALYTICS": "false",
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    # Refuse invalid predictions with 400 instead of storing them silently.
    "fflag_feat_utc_210_prediction_validation_15082025": "true",
}
TEMPLATE_MARK = "coreloop-template.json"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "interop: runs against a real third-party server")


def ls_missing() -> str | None:
    if (LS_VENV / "bin" / "label-studio").is_file():
        return None
    return f"no Label Studio venv at {LS_VENV}: run scripts/setup_label_studio.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def _ls_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LS_ENV_UNSET}
    return {**env, **LS_ENV, "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}


def _init_template(target: Path) -> None:
    work = target.with_name(f"{target.name}.{uuid.uuid4().hex[:6]}")
    work.mkdir(parents=True)
    command = [str(LS_VENV / "bin" / "label-studio"), "init", "-q", "--data-dir", str(work)]
    command += ["--username", LS_EMAIL, "--password", LS_PASSWORD, "--user-token", LS_TOKEN]
    command += ["--enable-legacy-api-token"]
    done = subprocess.run(command, env=_ls_env(work), capture_output=True, timeout=900, cwd=work)
    if done.returncode != 0:
        raise RuntimeError(f"label-studio init failed: {done.stdout[-3000:]!r}")
    (work / TEMPLATE_MARK).write_text(json.dumps({"email": LS_EMAIL, "token": LS_TOKEN}))
    shutil.rmtree(target, ignore_errors=True)
    work.rename(target)


@pytest.fixture(scope="session")
def ls_template() -> Path:
    """An initialised Label Studio data dir, made once and kept in the LS venv."""
    reason = ls_missing()
    if reason:
        pytest.skip(reason)
    target = LS_VENV / "coreloop-template"
    mark = target / TEMPLATE_MARK
    if not mark.is_file() or json.loads(mark.read_text()).get("token") != LS_TOKEN:
        _init_template(target)
    return target


DRIVER = r"""
import json, sys, traceback
import numpy as np
from label_studio_sdk.client import LabelStudio
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from label_studio_sdk.actions.types.prepare_params_request_request_selected_items_included import (
    PrepareParamsRequestRequestSelectedItemsIncluded as Included,
)

def tasks(ls, a):
    return sorted(t.id for t in ls.tasks.list(project=a["project"]))

OPS = {
    "create_project": lambda ls, a: ls.projects.create(
        title=a["title"], label_config=a["label_config"]).id,
    "import_tasks": lambda ls, a: (
        ls.projects.import_tasks(id=a["project"], request=a["tasks"]), tasks(ls, a))[1],
    "create_webhook": lambda ls, a: ls.webhooks.create(
        url=a["url"], project=a["project"], headers=a["headers"], send_payload=True,
        send_for_all_actions=True).id,
    "webhooks": lambda ls, a: [
        {"url": w.url, "headers": w.headers} for w in ls.webhooks.list(project=str(a["project"]))],
    "connect_ml": lambda ls, a: ls.ml.create(
        url=a["url"], project=a["project"], title="coreloop", auth_method="BASIC_AUTH",
        basic_auth_user=a["user"], basic_auth_pass=a["password"],
        extra_params=a.get("extra_params")).state,
    "retrieve_predictions": lambda ls, a: ls.actions.create(
        id="retrieve_tasks_predictions", project=a["project"],
        selected_items=Included(all_=False, included=a["tasks"])) and None,
    "predictions": lambda ls, a: [
        {"model_version": p.model_version, "score": p.score, "result": p.result}
        for p in ls.predictions.list(task=a["task"])],
    "annotate": lambda ls, a: ls.annotations.create(id=a["task"], result=a["result"]).id,
    "update_annotation": lambda ls, a: ls.annotations.update(
        id=a["id"], result=a["result"]).id,
    "whoami": lambda ls, a: ls.users.whoami().id,
    "mask2rle": lambda ls, a: [int(v) for v in mask2rle(np.array(a["mask"], dtype=np.uint8))],
    "decode_rle": lambda ls, a: decode_rle(a["rle"]).tolist(),
}

for line in sys.stdin:
    request = json.loads(line)
    try:
        args = request["args"]
        ls = LabelStudio(base_url=args["base_url"], api_key=args["token"], timeout=120) \
            if "base_url" in args else None
        reply = {"ok": OPS[request["op"]](ls, args)}
    except Exception as exc:
        reply = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    sys.stdout.write("@@" + json.dumps(reply, default=str) + "\n")
    sys.stdout.flush()
"""


class LsDriver:
    """label_studio_sdk calls made by a driver process in the LS venv (JSON lines)."""

    def __init__(self, script: Path) -> None:
        self.proc = subprocess.Popen(
            [str(LS_VENV / "bin" / "python"), "-u", str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def call(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, "args": args}) + "\n").encode())
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the Label Studio driver exited ({self.proc.poll()})")
            if line.startswith(b"@@"):
                reply = json.loads(line[2:])
                break
        if "error" in reply:
            raise AssertionError(f"label_studio_sdk {op}: {reply['error']}\n{reply['trace']}")
        return reply["ok"]


@pytest.fixture(scope="session")
def ls_driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LsDriver]:
    reason = ls_missing()
    if reason:
        pytest.skip(reason)
    script = tmp_path_factory.mktemp("ls-driver") / "driver.py"
    script.write_text(DRIVER)
    driver = LsDriver(script)
    yield driver
    stop(driver.proc)


@dataclass
class LabelStudioServer:
    url: str
    token: str
    driver: LsDriver

    def sdk(self, op: str, **args: Any) -> Any:
        return self.driver.call(op, base_url=self.url, token=self.token, **args)


def _log_file(path: Path) -> IO[bytes]:
    return path.open("wb")


def _start_ls(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--data-dir"]
    command += [str(data_dir), "--internal-host", "127.0.0.1", "-p", str(port), "--host", url]
    with _log_file(log_path) as out:
        proc = subprocess.Popen(
            command,
            env=_ls_env(data_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,
        )
    ready = f"Starting development server at {url}/"

    def started() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Label Studio exited: {log_path.read_text()[-3000:]}")
        return ready in log_path.read_text(errors="replace")

    try:
        wait_until(started, 180, f"Label Studio on port {port}")
    except BaseException:
        stop(proc)
        raise
    return proc, url


@pytest.fixture
def label_studio(
    ls_template: Path, ls_driver: LsDriver, tmp_path: Path
) -> Iterator[LabelStudioServer]:
    """Label Studio on a copy of the template data dir, on a free port."""
    data_dir = tmp_path / "ls-data"
    shutil.copytree(ls_template, data_dir)
    proc, url = _start_ls(data_dir, tmp_path / "label-studio.log")
    try:
        yield LabelStudioServer(url, LS_TOKEN, ls_driver)
    finally:
        stop(proc)


@dataclass
class CoreloopServer:
    url: str
    token: str  # an admin's
    sessions: sessionmaker[Session]
    storage: Storage
    integration_token: str  # Label Studio's credential (role integration: /ls/* only)

    def add_member(self, name: str) -> None:
        """An annotator standing for a Label Studio user (``ls:<id>``): the webhook records
        only annotations of existing members), a member of every project so far."""
        with unit_of_work(self.sessions) as session:
            session.add(
                User(name=name, role=Role.annotator.value, token_hash=hash_token(new_token()))
            )
            session.flush()
            grant_all(session)

    def get(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        response = httpx.get(f"{self.url}{path}", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def _start_api(settings: Settings, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CORELOOP_ENVIRONMENT": "test",
        "CORELOOP_DATA_DIR": str(settings.data_dir),
        "CORELOOP_DATABASE_URL": settings.db_url,
        "CORELOOP_EMBEDDED_WORKER": "false",
    }
    env.pop("CORELOOP_LS_OPEN", None)
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with _log_file(log_path) as out:
        proc = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"coreloop exited: {log_path.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/ls/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 60, "coreloop's API")
    except BaseException:
        stop(proc)
        raise
    return proc, url


@pytest.fixture
def coreloop(tmp_path: Path) -> Iterator[CoreloopServer]:
    """coreloop's API (uvicorn) on SQLite under ``tmp_path``, with an admin user and an
    integration credential for Label Studio."""
    settings = Settings(
        environment="test",
        data_dir=tmp_path / "coreloop",
        database_url=f"sqlite:///{tmp_path / 'coreloop.sqlite'}",
        embedded_worker=False,
    )
    engine = make_engine(settings)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    token, integration = new_token(), new_token()
    with unit_of_work(sessions) as session:
        session.add(User(name="admin", role=Role.admin.value, token_hash=hash_token(token)))
        session.add(
            User(
                name="label-studio",
                role=Role.integration.value,
                token_hash=hash_token(integration),
            )
        )
    proc, url = _start_api(settings, tmp_path / "coreloop.log")
    try:
        yield CoreloopServer(url, token, sessions, Storage(settings.files_dir), integration)
    finally:
        stop(proc)
        engine.dispose()
