"""benchmarks/paired_rows.py pairs two arms' learner rows by seed and applies ml.report's rule."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks.paired_rows import compare, main


def _write(path: Path, rows: list[tuple[int, float, float]], epochs: int = 8) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "seed", "epochs", "accuracy", "balanced_accuracy", "loader"])
        for seed, acc, bal in rows:
            writer.writerow(["x", seed, epochs, acc, bal, path.stem])
    return path


def test_pairs_by_seed_and_reports_the_verdict(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.csv", [(s, 0.60, 0.50) for s in range(6)] + [(9, 0.1, 0.1)])
    # b: balanced accuracy up by 0.10 +- 0.01 on every seed (in another order); accuracy equal
    b_rows = [(s, 0.60, 0.60 + 0.01 * (-1) ** s) for s in reversed(range(6))]
    b = _write(tmp_path / "b.csv", b_rows)
    report = compare(a, b)
    assert report["seeds"] == list(range(6)) and report["unpaired"] == [9]
    assert report["loaders"] == {"a": ["a"], "b": ["b"]}
    bal = report["metrics"]["balanced_accuracy"]
    assert bal["diffs"] == [0.11, 0.09, 0.11, 0.09, 0.11, 0.09]
    assert bal["mean_diff"] == pytest.approx(0.10) and bal["ci95"][0] > 0
    assert bal["verdict"] == "significant" and bal["p_sign_flip"] == pytest.approx(2 / 64, abs=1e-4)
    acc = report["metrics"]["accuracy"]
    assert acc["mean_diff"] == 0 and acc["verdict"] == "not significant"
    assert main([str(a), str(b), "--metric", "accuracy"]) == 0


def test_fewer_than_five_seeds_are_not_testable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.csv", [(s, 0.5, 0.5) for s in range(3)])
    b = _write(tmp_path / "b.csv", [(s, 0.9, 0.9) for s in range(3)])
    main([str(a), str(b)])
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["balanced_accuracy"]["verdict"].startswith("n < 5 seeds")


def test_a_seed_twice_or_another_recipe_is_refused(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.csv", [(1, 0.5, 0.5), (1, 0.6, 0.6)])
    with pytest.raises(ValueError, match="seed 1 appears twice"):
        compare(a, a)
    a = _write(tmp_path / "a.csv", [(1, 0.5, 0.5)])
    b = _write(tmp_path / "b.csv", [(1, 0.5, 0.5)], epochs=10)
    with pytest.raises(ValueError, match=r"seed 1: the arms differ in \['epochs'\]"):
        compare(a, b)


def test_one_seed_gives_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.csv", [(1, 0.5, 0.5)])
    b = _write(tmp_path / "b.csv", [(1, 0.6, 0.6)])
    main([str(a), str(b)])
    out = capsys.readouterr().out
    assert "NaN" not in out and json.loads(out)["metrics"]["accuracy"]["ci95"] == [None, None]
