"""`coreloop demo --simulate`: the README's first command, end to end with real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _demo_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "CORELOOP_DATA_DIR": str(data_dir)}
    env.pop("CORELOOP_DATABASE_URL", None)
    env.pop("CORELOOP_BROKER_URL", None)
    return env


def _run_demo(data_dir: Path, *extra: str, images: int = 90) -> str:
    env = _demo_env(data_dir)
    args = ["--images", str(images), "--epochs", "2", "--image-size", "32", "--budget", "12"]
    result = subprocess.run(
        [sys.executable, "-m", "coreloop.cli", "demo", *args, "--port", str(_free_port()), *extra],
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


def test_the_segmentation_demo_reports_jaccard_and_dice_on_its_test_split(tmp_path: Path) -> None:
    out = _run_demo(tmp_path, "--task", "segmentation", "--simulate", "--rounds", "1", "--exit",
                    images=40)  # fmt: skip
    assert "labeled the " in out and " test images with their masks" in out
    round_1 = next(line for line in out.splitlines() if "round 1 done: labels" in line)
    assert "'jaccard': " in round_1 and "'dice': " in round_1, out


def _state(pid: int) -> str | None:
    """The process's state letter (Linux ``/proc``), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # a zombie has stopped (it only awaits reaping)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_stops_the_api_and_the_worker_as_ctrl_c_does(tmp_path: Path) -> None:
    """``timeout``, docker and systemd stop with SIGTERM: no child may be left running."""
    args = ["--images", "30", "--epochs", "1", "--image-size", "32", "--port", str(_free_port())]
    demo = subprocess.Popen(
        [sys.executable, "-m", "coreloop.cli", "demo", *args],
        env=_demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def read() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            output.append(line)

    threading.Thread(target=read, daemon=True).start()
    children: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not any("API on http" in line for line in output):
            assert time.monotonic() < deadline and demo.poll() is None, "".join(output)
            time.sleep(0.2)
        children = _children(demo.pid)
        assert len(children) >= 2 and all(_alive(c) for c in children), children
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=90)
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [c for c in children if _alive(c)] == [], "".join(output)
        time.sleep(0.5)  # the reader thread takes the last lines
        assert "interrupted (SIGTERM)" in "".join(output)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for child in children:  # each child leads its own session: its group is its pid
            if _alive(child):
                with contextlib.suppress(OSError):
                    os.killpg(child, signal.SIGKILL)
