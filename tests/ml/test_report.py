"""Report statistics on a hand-made CSV: intervals, paired tests, Holm, labels needed, PNGs."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ml import report
from ml.report import (
    add_class_counts,
    curves,
    first_reaching,
    holm,
    labels_needed,
    labels_to_reach_endpoint,
    paired,
    paired_rounds,
    permutation_p,
    primary_endpoint,
    t_interval,
    verdict,
)

T_975_2 = 4.302652729911275  # Student t quantile, 2 degrees of freedom
T_975_5 = 2.570581835636314  # 5 degrees of freedom
ENDPOINT = "balanced_accuracy, mean over 10-30% labeled"
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
    # 95% of 0.80 = 0.76: random at 20% (every seed); confident coreset at 15% on the mean
    # curve and in seeds 1, 2; seed 0 crosses at 15% (0.77) but falls back to 0.75: not reached.
    mean_curve, per_seed = labels_needed(data, "random", 0.95)
    assert mean_curve == pytest.approx(0.2001) and set(per_seed.values()) == {mean_curve}
    mean_curve, per_seed = labels_needed(data, "confident_coreset", 0.95)
    assert mean_curve == pytest.approx(0.1501)
    assert per_seed[0] == math.inf
    assert per_seed[1] == per_seed[2] == mean_curve  # nominal fractions: whole rounds apart
    # 98% of 0.80 = 0.784: random never; confident coreset only seed 2 (0.79, then 0.81);
    # seed 1 crosses at 15% (0.80) and falls back to 0.78.
    _, per_seed = labels_needed(data, "confident_coreset", 0.98)
    assert per_seed[0] == per_seed[1] == math.inf and per_seed[2] == pytest.approx(0.1501)
    assert labels_needed(data, "random", 0.98)[0] == math.inf


def test_labels_to_reach_counts_only_a_crossing_that_holds() -> None:
    """The issue's case: random "reaches" the level at 30%, then falls below it at 35%."""
    curve = {0: (0.10, 0.60), 1: (0.15, 0.70), 2: (0.20, 0.69), 3: (0.25, 0.71), 4: (0.30, 0.76),
             5: (0.35, 0.74)}  # fmt: skip
    assert first_reaching(curve, 0.75) == math.inf  # crosses at 30%, below again at 35%
    assert first_reaching(curve, 0.74) == pytest.approx(0.30)  # stays from 30% on
    # 0.70 is first crossed at 15%, but 20% falls below: it holds only from 25%
    assert first_reaching(curve, 0.70) == pytest.approx(0.25)
    assert first_reaching(curve, 0.50) == pytest.approx(0.10)
    assert first_reaching({}, 0.5) == math.inf


def test_fewer_than_five_seeds_are_never_significant() -> None:
    three = paired([0.09, 0.10, 0.11])
    assert three.p_t < 0.01  # a tiny t-test p on 2 degrees of freedom ...
    assert verdict(three) == "n < 5 seeds: not testable"  # ... is not a finding
    assert report._significant(three, 0.001) == "n < 5 seeds: not testable"
    four = paired([0.09, 0.10, 0.11, 0.10])
    assert verdict(four) == "n < 5 seeds: not testable"
    five = paired([0.09, 0.10, 0.11, 0.10, 0.12])
    # 5 seeds: the t-test p is tiny, but the sign-flip p cannot go below 2/32 = 0.0625
    assert five.p_t < 0.001 and five.p_perm == pytest.approx(0.0625)
    assert verdict(five) == "not significant (t-test p < 0.05, sign-flip p is not)"
    assert report._significant(five, 0.001) == "yes"  # the exploratory tables: Holm p (t)
    six = paired([0.09, 0.10, 0.11, 0.10, 0.12, 0.08])
    assert six.p_perm == pytest.approx(2 / 64) and verdict(six) == "significant"
    assert verdict(paired([0.09, 0.10, 0.11, 0.10, 0.12, -0.08])) == "not significant"


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
    # per round: Holm over 3 tests; round 1 p = 0.0033 -> 0.0099, but 3 seeds: not testable.
    assert any(line.startswith("**Exploratory** (3 comparisons") for line in round_table)
    r1 = _row(round_table, "confident_coreset", "1", "15.0")
    assert r1[3].startswith("10.00 [") and r1[4] == "3" and r1[6] == "0.25"
    assert float(r1[7]) == pytest.approx(3 * 0.003315, rel=1e-2)
    assert r1[8] == "n < 5 seeds: not testable"
    assert _row(round_table, "confident_coreset", "2", "20.0")[-1] == "n < 5 seeds: not testable"
    # labels needed: 5 points fewer than random on seeds 1, 2 (zero spread -> permutation p
    # 0.5); seed 0 of confident coreset falls back below the level: reached only by random.
    needed = _row(needed_table, "95%", "confident_coreset")
    assert needed[2] == "15.0" and needed[4].startswith("-5.00 [-5.00, -5.00]")
    assert needed[5] == "2" and needed[6] == "0.5"
    assert needed[-2:] == ["n < 5 seeds: not testable", "0 / 1"]
    # 98%: random never reaches it, confident coreset on seed 2 only: censored.
    assert _row(needed_table, "98%", "confident_coreset")[-1] == "1 / 0"
    assert _row(needed_table, "98%", "random")[2] == "not reached"
    assert "full" in text and "## segmentation" not in text
    # the endpoints open the report: 3 seeds, so not testable whatever p says
    top = text.split("## classification")[0]
    primary = _row(top.split("### Primary")[1].splitlines(), ENDPOINT)
    assert primary[2] == "confident_coreset − random" and primary[-1] == "n < 5 seeds: not testable"


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


def _write_rows(path: Path, rows: list[dict[str, object]], fields: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    return path


def _endpoint_csv(path: Path) -> Path:
    """6 seeds (0-5) plus seed 6, which lacks confident_coreset's round 3; rounds 0-5 at
    10-35%. Balanced accuracy of confident_coreset - random: 0.01 * round + 0.002 * seed up to
    30%, then -0.30 at 35% (outside the endpoint's range). Accuracy = balanced + 0.4 for both.
    Segmentation: Jaccard of confident_coreset - random = 0.01 in every round and seed."""
    rows: list[dict[str, object]] = []
    for seed, rnd in itertools.product(range(7), range(6)):
        fraction = 0.10 + 0.05 * rnd + 1e-4 * seed
        base = 0.30 + 0.02 * rnd + 0.003 * seed
        diff = 0.01 * rnd + 0.002 * seed if rnd <= 4 else -0.30
        for strategy, value in (("random", base), ("confident_coreset", base + diff)):
            if strategy == "confident_coreset" and seed == 6 and rnd == 3:
                continue
            common = dict(strategy=strategy, seed=seed, round=rnd, fraction=fraction, labels=1)
            rows.append(dict(task="classification", balanced_accuracy=value, accuracy=value + 0.4,
                             **common))  # fmt: skip
            jaccard = 0.7 + 0.01 * rnd + (0.01 if strategy == "confident_coreset" else 0.0)
            rows.append(dict(task="segmentation", jaccard=jaccard, dice=jaccard, **common))
    return _write_rows(path, rows, [*FIELDS, "jaccard", "dice"])


def test_primary_endpoint_by_hand(tmp_path: Path) -> None:
    rows = report.read_rows(_endpoint_csv(tmp_path / "r.csv"))
    end = primary_endpoint(rows, arm="confident_coreset", baseline="random",
                           metric="balanced_accuracy", lo=0.10, hi=0.30)  # fmt: skip
    # rounds 0-4 (10-30%); per seed mean of 0.01 * r + 0.002 * s over r = 0..4: 0.02 + 0.002 s
    assert end.rounds == (0, 1, 2, 3, 4) and end.task == "classification"
    assert sorted(end.per_seed) == [0, 1, 2, 3, 4, 5]  # seed 6 lacks a round: left out
    for seed, value in end.per_seed.items():
        assert value == pytest.approx(0.02 + 0.002 * seed)
    sd = 0.002 * float(np.std(np.arange(6), ddof=1))
    half = T_975_5 * sd / math.sqrt(6)
    t = 0.025 / (sd / math.sqrt(6))
    assert end.stat.n == 6 and end.stat.mean == pytest.approx(0.025)
    assert (end.stat.low, end.stat.high) == pytest.approx((0.025 - half, 0.025 + half))
    assert end.stat.p_t == pytest.approx(2 * stats.t.sf(t, 5))
    assert end.stat.p_perm == pytest.approx(2 / 64)  # every seed positive: the floor at n = 6
    assert end.verdict == "significant"
    # the 35% round (-30 pp) is outside [10%, 30%]; with hi = 0.35 it enters
    wider = primary_endpoint(rows, hi=0.35)
    assert wider.rounds == (0, 1, 2, 3, 4, 5)
    assert wider.per_seed[0] == pytest.approx((0.10 - 0.30) / 6)
    # the defaults are the pre-registered primary endpoint; accuracy gives the same differences
    assert primary_endpoint(rows).per_seed == end.per_seed
    acc = primary_endpoint(rows, metric="accuracy")
    assert acc.per_seed == pytest.approx(end.per_seed)
    jac = primary_endpoint(rows, metric="jaccard")
    assert jac.task == "segmentation" and jac.per_seed == pytest.approx({s: 0.01 for s in range(6)})
    assert jac.stat.p_perm == pytest.approx(2 / 64) and jac.stat.p_t == jac.stat.p_perm


def test_labels_to_reach_endpoint_by_hand(tmp_path: Path) -> None:
    """Per seed: the fraction the arm needs to hold random's final value, minus random's."""
    values = {  # (strategy, seed) -> balanced accuracy at 10, 15, 20, 25%
        ("random", 0): (0.30, 0.35, 0.33, 0.40),  # target 0.40: random needs 25%
        ("random", 1): (0.30, 0.41, 0.42, 0.40),  # target 0.40: holds from 15%
        ("random", 2): (0.30, 0.33, 0.36, 0.38),  # target 0.38: 25%
        ("confident_coreset", 0): (0.30, 0.41, 0.39, 0.45),  # 15% falls back: 25%, diff 0
        ("confident_coreset", 1): (0.30, 0.39, 0.40, 0.47),  # 20%, diff +5
        ("confident_coreset", 2): (0.30, 0.40, 0.41, 0.37),  # ends below 0.38: censored
    }
    rows = [
        dict(task="classification", strategy=s, seed=seed, round=r, labels=1,
             fraction=0.10 + 0.05 * r + 1e-4 * seed, accuracy=v, balanced_accuracy=v)
        for (s, seed), curve in values.items()
        for r, v in enumerate(curve)
    ]  # fmt: skip
    path = _write_rows(tmp_path / "r.csv", rows, FIELDS)
    end = labels_to_reach_endpoint(report.read_rows(path))
    assert end.per_seed == pytest.approx({0: 0.0, 1: 0.05})
    assert end.censored == (2,) and end.stat.n == 2
    assert end.verdict == "n < 5 seeds: not testable"


def test_report_opens_with_the_endpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report.build_report(_endpoint_csv(tmp_path / "r.csv"), out)
    text = (out / "report.md").read_text()
    top = text.split("## classification")[0]
    primary = top.split("### Primary")[1].split("### Secondary")[0].splitlines()
    row = _row(primary, "balanced_accuracy, mean over 10-30% labeled", "classification")
    assert row[4] == "6" and row[5].startswith("2.50 [") and row[-1] == "significant"
    assert row[7] == "0.0312"
    secondary = top.split("### Secondary")[1].splitlines()
    assert _row(secondary, "accuracy, mean over 10-30% labeled")[-1] == "significant"
    assert _row(secondary, "jaccard, mean over 10-30% labeled", "segmentation")[4] == "6"
    # confident coreset ends 30 pp below random's final value in every seed: all censored
    name = "labels to reach random's final balanced_accuracy (% of the pool)"
    assert _row(secondary, name)[3:5] == ["not reached: 0, 1, 2, 3, 4, 5, 6", "0"]


def test_labeled_set_composition_beside_the_curves(tmp_path: Path) -> None:
    """The ``class_counts`` column: the majority class's share beside each curve point, each
    class's share at the last round; filled from the picks and the labels when absent."""
    counts = {  # (strategy, seed, round) -> {class: count}
        ("full", 0, 0): {"mel": 20, "nv": 80},
        ("random", 0, 0): {"mel": 2, "nv": 8},
        ("random", 0, 1): {"mel": 3, "nv": 17},
        ("random", 1, 1): {"mel": 5, "nv": 15},
        ("confident_coreset", 0, 1): {"mel": 10, "nv": 10},
        ("confident_coreset", 1, 1): {"mel": 12, "nv": 8},
    }
    rows = [
        dict(task="classification", strategy=s, seed=seed, round=r, labels=sum(c.values()),
             fraction=sum(c.values()) / 100, accuracy=0.7, balanced_accuracy=0.5,
             class_counts=json.dumps(c))
        for (s, seed, r), c in counts.items()
    ]  # fmt: skip
    path = _write_rows(tmp_path / "r.csv", rows, [*FIELDS, "class_counts"])
    loaded = report.read_rows(path)
    assert report.majority_class(report.compositions(loaded, "classification")) == "nv"
    out = tmp_path / "out"
    report.build_report(path, out)
    text = (out / "report.md").read_text()
    curve_rows = text.split("### accuracy: mean over seeds")[1].split("###")[0].splitlines()
    assert any(line.endswith("| nv % of labeled set |") for line in curve_rows)
    assert _row(curve_rows, "random", "1")[-1] == "80.0"  # (85 + 75) / 2
    assert _row(curve_rows, "confident_coreset", "1")[-1] == "45.0"  # (50 + 40) / 2
    comp = text.split("labeled set per class at the last round")[1].split("###")[0].splitlines()
    assert _row(comp, "full") == ["full", "0", "1", "20.0", "80.0"]
    assert _row(comp, "confident_coreset") == ["confident_coreset", "1", "2", "55.0", "45.0"]
    # the same cells from a sidecar and the data's labels (a CSV without the column)
    sel = tmp_path / "selections"
    sel.mkdir()
    (sel / "classification-random-seed0.json").write_text(json.dumps({"0": [0, 1], "1": [4]}))
    labels = np.array([1, 1, 0, 0, 0])  # classes ("mel", "nv"): rows 0, 1 nv; 4 mel
    bare = [dict(task="classification", strategy="random", seed="0", round=str(r),
                 labels=str(n)) for r, n in ((0, 2), (1, 3))]  # fmt: skip
    assert add_class_counts(bare, sel, labels, ("mel", "nv")) == 2
    assert json.loads(bare[1]["class_counts"]) == {"mel": 1, "nv": 2}
    wrong = [dict(task="classification", strategy="random", seed="0", round="1", labels="4")]
    with pytest.raises(ValueError, match="do not match"):
        add_class_counts(wrong, sel, labels, ("mel", "nv"))
