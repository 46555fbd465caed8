"""benchmarks/side_by_side.py: two checkouts under load at once, with their ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.side_by_side import _both_args, _ratio, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_load_arguments_follow_the_double_dash_and_the_base_must_be_a_checkout(
    tmp_path: Path,
) -> None:
    args, load_args = parse_args(["--base", str(ROOT), "--runs", "2", "--", "--db", "sqlite"])
    assert args.base == ROOT and args.runs == 2 and load_args == ["--db", "sqlite"]
    with pytest.raises(SystemExit):
        parse_args(["--base", str(tmp_path)])  # not a checkout
    with pytest.raises(SystemExit):
        parse_args(["--base", str(ROOT), "--runs", "0"])


def test_ratios_skip_what_was_not_measured() -> None:
    assert _ratio(150.0, 100.0) == 1.5
    assert _ratio("n/a", "n/a") is None and _ratio(1.0, 0) is None


@pytest.mark.e2e
@pytest.mark.slow
def test_a_tiny_run_against_this_same_checkout() -> None:
    load = ["--db", "sqlite", "--annotators", "2", "--seconds", "1", "--warmup", "0.5"]
    load += ["--items", "3000", "--workers", "1", "--rate", "0"]
    cmd = [sys.executable, "-m", "benchmarks.side_by_side", "--base", str(ROOT), "--runs", "1"]
    proc = subprocess.run(
        [*cmd, "--", *load], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    result = json.loads(line)
    assert result["new"]["cycles_per_s"] > 0 and result["base"]["cycles_per_s"] > 0
    assert result["ratio"]["cycles_per_s"] > 0
    assert result["ratio"]["cpu_ms_per_cycle.db"] is None  # SQLite: no database process
    assert result["client"] == {"new": "lean", "base": "lean"}
    for checks in result["checks"].values():
        assert checks == {"errors": {}, "double_leases": 0, "labels_lost": 0}
    assert "median x" in proc.stderr


def test_both_halves_run_httpx_against_a_base_without_the_lean_client(tmp_path: Path) -> None:
    old = tmp_path / "benchmarks"
    old.mkdir()
    (old / "load.py").write_text('parser.add_argument("--serve")\n')
    db = ["--db", "sqlite"]
    assert _both_args(tmp_path, db) == ([*db, "--client", "httpx"], db)
    assert _both_args(tmp_path, [*db, "--client", "httpx"]) == ([*db, "--client", "httpx"], db)
    assert _both_args(tmp_path, ["--client=httpx", *db]) == ([*db, "--client", "httpx"], db)
    with pytest.raises(ValueError, match="not --client lean"):
        _both_args(tmp_path, ["--client", "lean"])
    with pytest.raises(SystemExit):  # refused before anything runs
        parse_args(["--base", str(tmp_path), "--", "--client", "lean"])
    both = [*db, "--client", "lean"]
    assert _both_args(ROOT, both) == (both, both)  # both have the choice
