"""--deterministic: the same simulate command, run twice in fresh processes, writes the same CSV
(issue 12); and the switches it sets."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ml.determinism import PORTABLE_ENV, make_deterministic
from tests.ml.test_ham10000 import write_ham_layout

TIMING = {"train_seconds", "select_seconds", "wall_seconds"}


def _run(layout: Path, out: Path) -> list[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    args = [sys.executable, "-m", "ml.simulate", "--data", str(layout), "--out", str(out),
            "--strategies", "random,confident_coreset", "--seeds", "0", "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--initial-fraction",
            "0.2", "--budget-fraction", "0.2", "--final-fraction", "0.4", "--no-progress",
            "--deterministic"]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with (out / "results.csv").open(newline="") as handle:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(handle)]


def test_a_deterministic_run_repeats_exactly(tmp_path: Path) -> None:
    layout = write_ham_layout(tmp_path / "ham")
    first = _run(layout, tmp_path / "a")
    second = _run(layout, tmp_path / "b")
    assert len(first) == 5  # full + 2 strategies x 2 rounds
    assert first == second
    picks = sorted((tmp_path / "a" / "selections").iterdir())
    for path in picks:
        assert path.read_text() == (tmp_path / "b" / "selections" / path.name).read_text()


def test_make_deterministic_in_a_fresh_process() -> None:
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV}
    code = (
        "import json; from ml.determinism import make_deterministic; "
        "print(json.dumps(make_deterministic(1)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    settings = json.loads(done.stdout.strip().splitlines()[-1])
    assert settings["threads"] == 1 and settings["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert settings["cpu_capability"] in ("AVX2", "DEFAULT", "NO AVX")  # never AVX-512


@pytest.fixture
def restore_torch(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_torch")
def test_make_deterministic_in_this_process() -> None:
    """Here torch has already run kernels: on an AVX-512 CPU it is too late to pin them, and
    make_deterministic says so instead of pretending."""
    torch.ones(64).sum()  # some kernel has run
    if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        with pytest.raises(RuntimeError, match="before any torch work"):
            make_deterministic(1)
    else:
        assert make_deterministic(1)["threads"] == 1
        assert torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="threads"):
        make_deterministic(0)
