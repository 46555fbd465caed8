"""Layering rules: the API never imports torch, ``ml`` never imports the app, code never commits."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_NO_TORCH = """
import importlib, pkgutil, sys
import app
from app.main import create_app
from app.settings import Settings

create_app(Settings(data_dir=sys.argv[1]), migrate=False)
for module in pkgutil.walk_packages(app.__path__, "app."):
    importlib.import_module(module.name)
heavy = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
assert not heavy, f"the API imported {heavy}"
"""


def test_the_api_never_imports_torch(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def _python_files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def _imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_ml_never_imports_app_or_worker() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in _python_files("ml")
        if (found := _imported_roots(ast.parse(path.read_text(), str(path))) & {"app", "worker"})
    }
    assert offenders == {}


def test_app_never_imports_worker_ml_or_the_tools() -> None:
    """The API stands alone: not even a function of ``app`` imports ``worker``, ``ml`` or the
    tools around it (``coreloop``: the CLI, the demo), which may import ``app``."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in _python_files("app")
        if (
            found := _imported_roots(ast.parse(path.read_text(), str(path)))
            & {"worker", "ml", "coreloop"}
        )
    }
    assert offenders == {}


def test_only_the_unit_of_work_commits() -> None:
    """The request (or the task) is the unit of work: in ``app`` only ``app.db`` commits."""
    offenders = []
    for path in _python_files("app"):
        if path == ROOT / "app" / "db.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "commit"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# The concept packages of ``app``: each has its endpoints (the HTTP surface), its service (the
# rules) and, where it has any, its schemas.
CONCEPTS = (
    "users",
    "members",
    "projects",
    "images",
    "queue",
    "labels",
    "review",
    "agreement",
    "rounds",
    "warm_start",
    "model_versions",
    "exports",
    "webhooks",
    "integrations/labelstudio",
)

# Which package owns the writes to each table: a bulk UPDATE/DELETE/INSERT on a table is
# written only there (other packages call that package's service).
OWNER = {
    "User": "users",
    "ProjectMember": "members",
    "Project": "projects",
    "Image": "images",
    "QueueItem": "queue",
    "Lease": "queue",
    "Label": "labels",
    "ReviewItem": "review",
    "ReviewSkip": "review",
    "Round": "rounds",
    "WarmStart": "warm_start",
    "ModelVersion": "model_versions",
    "Event": "webhooks",
    "WebhookSubscription": "webhooks",
    "WebhookDelivery": "webhooks",
}


def _router_modules() -> set[str]:
    """Every module of ``app`` that defines a module-level ``router``."""
    found = set()
    for path in _python_files("app"):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "router" for target in node.targets
            ):
                found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_each_concept_is_one_package_with_its_endpoints_and_service() -> None:
    for concept in CONCEPTS:
        package = ROOT / "app" / concept
        assert (package / "endpoints.py").is_file(), concept
        assert (package / "service.py").is_file(), concept
    for old in ("routers", "services", "schemas"):
        assert not (ROOT / "app" / old).exists(), f"app/{old} is back"


def test_the_app_mounts_every_router_and_only_those() -> None:
    from app.main import ROUTERS

    assert set(ROUTERS) == _router_modules()
    assert len(ROUTERS) == len(set(ROUTERS))


_QUERY_CALLS = {"select", "update", "delete", "insert", "text"}
_SESSION_QUERIES = {"execute", "scalars", "scalar", "get", "query"}


def test_endpoints_hold_no_queries() -> None:
    """Endpoints are thin: they call their service, which holds the queries."""
    offenders = []
    for module in _router_modules():
        path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if (isinstance(func, ast.Name) and func.id in _QUERY_CALLS) or (
                isinstance(func, ast.Attribute)
                and func.attr in _SESSION_QUERIES
                and isinstance(func.value, ast.Name)
                and func.value.id == "session"
            ):
                offenders.append(f"{module}:{node.lineno}")
    assert offenders == []


def _bulk_writes(tree: ast.AST) -> set[str]:
    """The tables written by ``update(T)``, ``delete(T)`` or ``insert(T)`` in ``tree``."""
    tables = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"update", "delete", "insert"}
            and node.args
            and isinstance(node.args[0], ast.Name)
        ):
            tables.add(node.args[0].id)
    return tables


def test_bulk_writes_to_a_table_live_in_its_package() -> None:
    offenders = []
    for path in _python_files("app"):
        relative = path.relative_to(ROOT / "app")
        for table in _bulk_writes(ast.parse(path.read_text(), str(path))) & set(OWNER):
            if not relative.as_posix().startswith(OWNER[table] + "/"):
                offenders.append(f"{relative}: {table}")
    assert offenders == []


def _task_comparisons(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing something with a kind's name (``task == "segmentation"``)."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(
            isinstance(side, ast.Constant) and side.value in names
            for side in (node.left, *node.comparators)
        )
    ]


def test_only_the_label_kinds_know_the_kinds_by_name() -> None:
    """What differs by kind in the API asks the registry (``app.labels.kinds.kind_of``), so
    that a new kind is one module there plus a migration (the worker's training, which maps a
    task to ``ml``'s models, is the other place a new kind adds code)."""
    from app.labels.kinds import KINDS

    kinds_dir = ROOT / "app" / "labels" / "kinds"
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _python_files("app")
        if kinds_dir not in path.parents
        for line in _task_comparisons(ast.parse(path.read_text(), str(path)), set(KINDS))
    ]
    assert offenders == []


def test_the_checks_see_real_code() -> None:
    """Guard against the scans above passing vacuously (a moved folder, a wrong root)."""
    assert _python_files("ml") and _python_files("app", "labels") and _python_files("app")
    assert len(_router_modules()) >= len(CONCEPTS)
    assert _bulk_writes(ast.parse("update(Lease).where(x)\nselect(Label)")) == {"Lease"}
    assert _task_comparisons(ast.parse("x = 1\nif p.task != 'boxes': pass"), {"boxes"}) == [2]
    sample = ast.parse("from app.db import commit\nimport worker.tasks\nsession.commit()\n")
    assert _imported_roots(sample) == {"app", "worker"}


def test_no_two_routers_claim_the_same_request() -> None:
    """The routers are matched in ``ROUTERS`` order, the hot paths first (app.main): that order
    may change no route's meaning, so no route of one router matches a path of another's for a
    method both take."""
    import importlib
    import re

    from starlette.routing import Route

    from app.main import ROUTERS

    routes = [
        (name, route)
        for name in ROUTERS
        for route in importlib.import_module(name).router.routes
        if isinstance(route, Route)
    ]
    assert len(routes) > 50

    def concrete(path: str) -> str:
        return re.sub(r"\{[^}]+\}", "1", path)

    clashes = [
        (a.path, b.path)
        for i, (name_a, a) in enumerate(routes)
        for name_b, b in routes[i + 1 :]
        if name_a != name_b
        and set(a.methods or ()) & set(b.methods or ())
        and (a.path_regex.match(concrete(b.path)) or b.path_regex.match(concrete(a.path)))
    ]
    assert clashes == []
