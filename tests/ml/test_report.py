"""Report statistics on a hand-made CSV: intervals, paired tests, Holm, labels needed, PNGs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from ml import report
from ml.report import curves, holm, labels_needed, paired, paired_rounds, permutation_p, t_interval

T_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom
FIELDS = [
    "task",
    "strategy",
    "seed",
    "round",
    "labels",
    "fraction",
    "accuracy",
    "balanced_accuracy",
]

# accuracy per (strategy, round) for seeds 0, 1, 2; the full-data model reaches 0.80 each seed.
ACCURACY = {
    ("random", 0): (0.60, 0.62, 0.64),
    ("random", 1): (0.68, 0.70, 0.68),
    ("random", 2): (0.77, 0.77, 0.78),
    ("confident_coreset", 0): (0.60, 0.62, 0.64),  # same initial set: identical
    ("confident_coreset", 1): (0.77, 0.80, 0.79),  # diffs 0.09, 0.10, 0.11
    ("confident_coreset", 2): (0.75, 0.78, 0.81),  # diffs -0.02, 0.01, 0.03
    ("full", 0): (0.80, 0.80, 0.80),
}


def write_csv(path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for (strategy, rnd), values in ACCURACY.items():
            for seed, value in enumerate(values):
                # pool sizes differ a little between seeds, so do the labeled fractions
                fraction = 1.0 if strategy == "full" else 0.10 + 0.05 * rnd + 1e-4 * seed
                writer.writerow(dict(task="classification", strategy=strategy, seed=seed,
                                     round=rnd, labels=int(fraction * 1000), fraction=fraction,
                                     accuracy=value, balanced_accuracy=value - 0.2))  # fmt: skip
    return path


def test_t_interval_matches_hand_computation() -> None:
    mean, low, high = t_interval([0.60, 0.62, 0.64])
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert mean == pytest.approx(0.62)
    assert (low, high) == pytest.approx((0.62 - half, 0.62 + half))
    assert math.isnan(t_interval([0.5])[1])


def test_paired_statistics() -> None:
    stat = paired([0.09, 0.10, 0.11])
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert stat.n == 3 and stat.mean == pytest.approx(0.10)
    assert (stat.low, stat.high) == pytest.approx((0.10 - half, 0.10 + half))
    assert stat.p_t == pytest.approx(0.0033150, rel=1e-3)  # t = 17.32 on 2 df
    assert stat.p_perm == pytest.approx(0.25)  # the floor with 3 seeds: 2 / 2**3
    assert paired([0.0, 0.0, 0.0]).p_t == 1.0
    # zero spread: t is undefined, the permutation p stands in (never 0 with few seeds)
    assert paired([-0.05, -0.05, -0.05]).p_t == pytest.approx(0.25)
    assert permutation_p([0.1, -0.1, 0.2, 0.3, 0.4]) == pytest.approx(6 / 32)


def test_holm() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)


def test_paired_rounds_and_labels_needed(tmp_path: Path) -> None:
    data = curves(report.read_rows(write_csv(tmp_path / "r.csv")), "classification", "accuracy")
    by_round = {rnd: stat for rnd, _, stat in paired_rounds(data, "confident_coreset")}
    assert by_round[0].mean == 0.0 and by_round[0].p_t == 1.0
    assert by_round[1].mean == pytest.approx(0.10) and by_round[1].p_t < 0.01
    assert by_round[2].p_t > 0.5
    # 95% of 0.80 = 0.76: random at 20% (every seed), confident coreset at 15%.
    mean_curve, per_seed = labels_needed(data, "random", 0.95)
    assert mean_curve == pytest.approx(0.2001) and set(per_seed.values()) == {mean_curve}
    mean_curve, per_seed = labels_needed(data, "confident_coreset", 0.95)
    assert mean_curve == pytest.approx(0.1501)
    assert set(per_seed.values()) == {mean_curve}  # nominal fractions: whole rounds apart
    # 98% of 0.80 = 0.784: random never; confident coreset: seed 0 never, seeds 1, 2 at 15%.
    _, per_seed = labels_needed(data, "confident_coreset", 0.98)
    assert per_seed[0] == math.inf and per_seed[1] == per_seed[2] == pytest.approx(0.1501)
    assert labels_needed(data, "random", 0.98)[0] == math.inf


def _row(lines: list[str], *cells: str) -> list[str]:
    """The cells of the first markdown table row that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    found = next(line for line in lines if line.startswith(prefix))
    return [c.strip() for c in found.strip("|").split("|")]


def test_report_tables_flags_and_pngs(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "results.csv")
    assert report.main(["--csv", str(csv_path), "--out", str(tmp_path / "out")]) == 0
    for name in ("learning-curve-classification.png", "paired-diff-classification.png"):
        png = tmp_path / "out" / name
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "out" / "report.md").read_text()
    acc = text.split("## classification")[1].split("### balanced_accuracy")[0]
    needed_table = acc.split("labels needed")[1].split("paired difference")[0].splitlines()
    round_table = acc.split("paired difference to random per round")[1].splitlines()
    # per round: Holm over 3 tests; round 1 p = 0.0033 -> 0.0099, significant; round 2 not.
    r1 = _row(round_table, "confident_coreset", "1", "15.0")
    assert r1[3].startswith("10.00 [") and r1[4] == "3" and r1[6] == "0.25"
    assert float(r1[7]) == pytest.approx(3 * 0.003315, rel=1e-2) and r1[8] == "yes"
    assert _row(round_table, "confident_coreset", "2", "20.0")[-1] == "no"
    assert _row(round_table, "confident_coreset", "0", "10.0")[-1] == "no"
    # labels needed: 5 points fewer than random on every seed; zero spread -> permutation p 0.25.
    needed = _row(needed_table, "95%", "confident_coreset")
    assert needed[2] == "15.0" and needed[4].startswith("-5.00 [-5.00, -5.00]")
    assert needed[6] == "0.25" and needed[-2:] == ["no", "0 / 0"]
    # 98%: random never reaches it, confident coreset on 2 seeds: no paired difference, censored.
    assert _row(needed_table, "98%", "confident_coreset")[-2:] == ["no", "2 / 0"]
    assert _row(needed_table, "98%", "random")[2] == "not reached"
    assert "full" in text and "## segmentation" not in text


def test_class_recall_table_uses_each_seeds_last_round(tmp_path: Path) -> None:
    """Mean recall over seeds at the last round, the paired difference to random in brackets;
    a class absent from a seed's test split (null) is left out of that seed only."""

    def cell(akiec: float | None, nv: float) -> str:
        return json.dumps({"akiec": akiec, "nv": nv})

    recalls = {  # (strategy, seed, round) -> cell
        ("full", 0, 0): cell(0.5, 0.9),
        ("full", 1, 0): cell(None, 0.9),
        ("random", 0, 0): cell(0.0, 1.0),  # an earlier round: ignored
        ("random", 0, 1): cell(0.1, 0.95),
        ("random", 1, 1): cell(0.3, 0.97),
        ("confident_coreset", 0, 1): cell(0.4, 0.91),
        ("confident_coreset", 1, 1): cell(None, 0.93),
    }
    path = tmp_path / "results.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*FIELDS, "class_recall"])
        writer.writeheader()
        for (strategy, seed, rnd), value in recalls.items():
            writer.writerow(dict(task="classification", strategy=strategy, seed=seed, round=rnd,
                                 labels=1, fraction=0.1, accuracy=0.5, balanced_accuracy=0.5,
                                 class_recall=value))  # fmt: skip
    lines = report.class_recall_table(report.read_rows(path), "classification")
    assert lines[0] == "| strategy | seeds | akiec | nv |"
    assert _row(lines, "full") == ["full", "2", "50.0", "90.0"]
    assert _row(lines, "random") == ["random", "2", "20.0", "96.0"]
    # akiec: seed 0 only (+30 pp); nv: -4 pp on both seeds
    assert _row(lines, "confident_coreset") == [
        "confident_coreset",
        "2",
        "40.0 (+30.0)",
        "92.0 (-4.0)",
    ]
    assert report.class_recall_table(report.read_rows(path), "segmentation") == []


def test_report_main_rejects_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        report.main(["--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path)])
