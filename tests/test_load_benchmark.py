"""benchmarks/load.py runs end to end at a tiny size on SQLite: the closed loop, then the open
loop, with its correctness checks and CPU per cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import disk_sync, stalls
from benchmarks.load import (
    _arrival_offsets,
    _latency_ms,
    _serve_command,
    _tree_cpu_seconds,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]


def test_fixed_timetable_is_one_arrival_every_one_over_rate() -> None:
    offsets = _arrival_offsets(20.0, 2.0, poisson=False)
    assert len(offsets) == 40
    assert offsets[0] == 0.0 and offsets[-1] == pytest.approx(1.95)
    assert np.allclose(np.diff(offsets), 0.05)


def test_poisson_timetable_is_seeded_and_has_the_rate() -> None:
    offsets = _arrival_offsets(100.0, 50.0, poisson=True, seed=3)
    assert offsets == _arrival_offsets(100.0, 50.0, poisson=True, seed=3)
    assert offsets != _arrival_offsets(100.0, 50.0, poisson=True, seed=4)
    assert all(0.0 <= t < 50.0 for t in offsets) and offsets == sorted(offsets)
    assert len(offsets) == pytest.approx(5000, rel=0.05)
    assert np.diff(offsets).std() == pytest.approx(0.01, rel=0.1)  # exponential: std = mean


def test_latency_percentiles_are_ordered() -> None:
    report = _latency_ms([0.001 * i for i in range(1, 101)])
    assert report["n"] == 100 and report["max"] == 100.0
    assert report["p50"] <= report["p90"] <= report["p99"] <= report["max"]
    assert np.isnan(_latency_ms([])["p50"])


def test_tree_cpu_counts_the_children() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn!r}])\n"
    with subprocess.Popen([sys.executable, "-c", child]) as proc:
        time.sleep(0.1)  # its child is alive (burning), not yet reaped
        seen = 0.0
        while proc.poll() is None:
            seen = max(seen, _tree_cpu_seconds(proc.pid))
            time.sleep(0.02)
    assert seen >= 0.2


def test_rate_zero_skips_the_open_loop_and_negative_is_refused() -> None:
    assert parse_args(["--rate", "0"]).rate == 0
    with pytest.raises(SystemExit):
        parse_args(["--rate", "-1"])


def test_serve_takes_its_own_process_count_unless_workers_is_given() -> None:
    assert "--workers" not in _serve_command(8000)
    assert _serve_command(8000, 1)[-2:] == ["--workers", "1"]
    assert parse_args([]).workers is None
    assert parse_args(["--serve", "--workers", "3"]).workers == 3


@pytest.mark.e2e
@pytest.mark.slow
def test_tiny_run_reports_both_loops(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.load", "--db", "sqlite", "--annotators", "2"]
    cmd += ["--trace", str(trace)]
    # Enough items for a fast machine: 1,000 ran out before the open loop (2026-12-07).
    cmd += ["--seconds", "2", "--warmup", "0.5", "--items", "5000", "--workers", "1"]
    cmd += ["--rate", "20", "--open-seconds", "2"]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert report["cycles"] > 0 and report["errors"] == {}
    assert report["double_leases"] == 0 and report["labels_lost"] == 0
    assert report["cpu_ms_per_cycle"]["server"] > 0 and report["cpu_ms_per_cycle"]["client"] > 0
    assert report["cpu_ms_per_cycle"]["db"] == "n/a"  # SQLite: in the server's processes
    assert 0 < report["cpu_share_of_cores"]["server"] <= 1

    loop = report["open_loop"]
    assert loop["offered_per_s"] == 20 and loop["scheduled"] == 40
    assert loop["errors"] == {} and loop["not_started"] == 0 and loop["cycles"] == 40
    assert loop["achieved_per_s"] == pytest.approx(20, rel=0.25)
    latency = loop["latency_ms"]
    assert latency["n"] == 40
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["p50"] >= loop["service_ms"]["p50"] * 0.99  # from the schedule: never less
    assert loop["double_leases"] == 0 and loop["images_over_k_reads"] == 0
    assert loop["images_read_twice_by_one"] == 0 and loop["labels_lost"] == 0
    assert loop["cpu_ms_per_cycle"]["server"] > 0 and loop["cpu_ms_per_cycle"]["client"] > 0
    assert "open loop: offered 20.0/s" in proc.stderr

    # --trace: every measured request, both loops, in order of its start.
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert report["traced_requests"] == len(rows)
    closed = [row for row in rows if row["phase"] == "closed"]
    opened = [row for row in rows if row["phase"] == "open"]
    assert len(closed) == 2 * report["cycles"] and len(opened) == 2 * 40
    assert {row["request"] for row in rows} == {"GET /queue", "POST /labels"}
    assert [row["start"] for row in rows] == sorted(row["start"] for row in rows)
    assert max(row["start"] for row in closed) < min(row["start"] for row in opened)
    assert all(row["ms"] > 0 for row in rows)


def test_disk_sync_reports_latencies_and_leaves_no_file(tmp_path: Path) -> None:
    report = disk_sync.measure(tmp_path, seconds=0.2, stall_ms=50.0, segment_bytes=3 * 8192)
    assert isinstance(report["syncs"], int) and report["syncs"] > 3  # round the segment
    assert report["segment_bytes"] == 3 * 8192
    assert list(tmp_path.iterdir()) == []
    ms = report["ms"]
    assert isinstance(ms, dict)
    assert 0 <= ms["p50"] <= ms["p99"] <= ms["p999"] <= ms["max"]  # (tmpfs: about 0)
    assert isinstance(report["stalls"], int) and 0 <= report["stalls"] <= report["syncs"]


def test_disk_sync_keeps_its_timetable(tmp_path: Path) -> None:
    # On tmpfs where there is one: a stall of the disk past the window's end would leave out
    # syncs (what the benchmark is for, not what this test checks).
    shm = Path("/dev/shm")
    directory = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    report = disk_sync.measure(directory, seconds=0.5, stall_ms=50.0, rate=40, segment_bytes=8192)
    assert report["syncs"] == 20  # one every 25 ms from the start, none beyond the window


def test_stalls_lays_the_calls_beside_the_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    requests = tmp_path / "requests.jsonl"
    rows = [
        ("closed", 100.000, 400.0),  # through the whole stall
        ("closed", 100.050, 300.0),  # through it too
        ("closed", 100.010, 20.0),  # answered before it
        ("closed", 100.190, 30.0),  # answered during it: then it was no stall
        ("open", 105.000, 5.0),
    ]
    requests.write_text(
        "".join(
            json.dumps({"phase": p, "request": "GET /queue", "start": s, "ms": ms}) + "\n"
            for p, s, ms in rows
        )
    )
    calls = tmp_path / "calls.txt"
    calls.write_text(
        "some message of perf\n"
        "  100100.000 (200.000 ms): python/13369 fdatasync(fd: 13)            = 0\n"
        "  105001.000 ( 1.500 ms): fdatasync(fd: 12) = 0\n"
        "  900000.000 (50.000 ms): fdatasync(fd: 12) = 0\n"  # after the benchmark: left out
    )
    assert stalls.main(["--requests", str(requests), "--calls", str(calls)]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [
        {
            "start": 100.1,
            "ms": 200.0,
            "call": "python/13369 fdatasync(fd: 13) = 0",
            "phase": "closed",
            "responses_during": 1,
            "in_flight_throughout": 2,
            "slowest_overlapping_ms": 400.0,
        },
        {
            "start": 105.001,
            "ms": 1.5,
            "call": "fdatasync(fd: 12) = 0",
            "phase": "open",
            "responses_during": 0,
            "in_flight_throughout": 1,
            "slowest_overlapping_ms": 5.0,
        },
    ]
