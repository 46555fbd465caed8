"""benchmarks/gpu_round.py runs end to end on the CPU at its tiny size and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


def test_synthetic_pool_is_seeded_and_coloured() -> None:
    from benchmarks.gpu_round import COLOURS, synthetic_pool

    a, ca = synthetic_pool(10, 32, seed=1)
    b, cb = synthetic_pool(10, 32, seed=1)
    assert a.dtype == np.uint8 and a.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)
    for img, c in zip(a, ca, strict=True):  # the disc carries the class colour
        assert (img == COLOURS[c]).all(-1).sum() > 0.05 * 32 * 32


def test_tiny_run_on_cpu_writes_every_phase(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmarks.gpu_round", "--tiny", "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, "--threads", "1", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_round.json").read_text())
    assert report["errors"] == [] and report["skipped"] == []
    assert report["env"]["device"] == "cpu"
    bench = report["select_bench"]
    assert bench["n"] == 3000 and bench["picked"] == 100 and bench["ours_s"] > 0
    sizes = [r["image_size"] for r in report["rounds"]]
    assert sizes == [32, 64]
    for r in report["rounds"]:
        assert r["picked"] == r["budget"] == 8
        for key in ("train_images_per_s", "score_images_per_s", "select_s", "round_s"):
            assert r[key] > 0, key
        assert r["loader"] == "dataloader"  # the training default on the CPU
    assert [t["device"]["image_size"] for t in report["throughput"]] == [32, 64]
    for t in report["throughput"]:
        ours, base = t["device"], t["dataloader"]
        assert (ours["loader"], base["loader"]) == ("device", "dataloader")
        assert ours["images"] == base["images"] == 32 and ours["epochs"] == 2
        assert t["ratio"] == round(ours["images_per_s"] / base["images_per_s"], 2) > 0


def test_budget_skips_phases(tmp_path: Path) -> None:
    from benchmarks.gpu_round import main

    rc = main(["--tiny", "--device", "cpu", "--budget-s", "-1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_round.json").read_text())
    assert rc == 0 and report["rounds"] == [] and report["select_bench"] is None
    assert report["skipped"] == [
        "select_bench",
        "round_32px",
        "throughput_32px",
        "round_64px",
        "throughput_64px",
    ]
    rc = main(["--tiny", "--device", "cpu", "--skip-select-bench", "--skip-rounds",
               "--skip-throughput", "--out", str(tmp_path)])  # fmt: skip
    report = json.loads((tmp_path / "gpu_round.json").read_text())
    assert rc == 0 and report["skipped"] == [] and report["rounds"] == []
