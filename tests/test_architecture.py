"""Layering rules: the API never imports torch, ``ml`` never imports the app, code never commits."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("package", ["app/services", "app/routers"])
def test_services_and_routers_never_commit(package: str) -> None:
    """The request (or the task) is the unit of work: only ``app.db``/``app.deps`` commit."""
    offenders = []
    for path in _python_files(*package.split("/")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "commit"
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_checks_see_real_code() -> None:
    """Guard against the scans above passing vacuously (a moved folder, a wrong root)."""
    assert _python_files("ml") and _python_files("app", "services") and _python_files("app")
    assert _python_files("app", "routers")
    sample = ast.parse("from app.db import commit\nimport worker.tasks\nsession.commit()\n")
    assert _imported_roots(sample) == {"app", "worker"}
