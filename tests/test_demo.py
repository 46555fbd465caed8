"""`coreloop demo --simulate`: the README's first command, end to end with real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_demo(data_dir: Path, *extra: str) -> str:
    env = {**os.environ, "CORELOOP_DATA_DIR": str(data_dir)}
    env.pop("CORELOOP_DATABASE_URL", None)
    env.pop("CORELOOP_BROKER_URL", None)
    args = ["--images", "90", "--epochs", "2", "--image-size", "32", "--budget", "12"]
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", *args, "--port", str(_free_port()), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_demo_runs_rounds_with_the_oracle_then_reuses_its_data(tmp_path: Path) -> None:
    out = _run_demo(tmp_path, "--simulate", "--rounds", "1", "--exit")
    assert "SYNTHETIC images" in out
    assert "round 0 done" in out
    assert "oracle labeled" in out
    assert "round 1 done: labels" in out
    assert "annotator token: cl_" in out
    # A second run reuses the data directory: same project, no new upload, no new round 0.
    again = _run_demo(tmp_path, "--exit")
    assert "reusing project 'demo-classification'" in again
    assert "round 0 queued" not in again
