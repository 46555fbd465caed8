"""Two arms of ``benchmarks.learner`` rows, paired by seed: the per-seed differences of each
metric (B minus A) with the project's paired statistics (:func:`ml.report.paired`: mean, 95%
t-interval, t-test and exact sign-flip p) and its verdict (:func:`ml.report.verdict`).

    .venv/bin/python -m benchmarks.paired_rows A.csv B.csv [--metric balanced_accuracy ...]

Prints one JSON object: the seeds paired, each file's ``loader`` values, and per metric the two
arms' means, the differences and the statistics (null where undefined). Seeds found in one file
only are listed and left out; a seed twice in one file is an error (which run would count?), and
so is a pair whose recipe columns (:data:`RECIPE`) differ: only the arm's setting may.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ml.report import paired, read_rows, verdict

METRICS = ("balanced_accuracy", "accuracy")
RECIPE = ("image_size", "epochs", "lr", "class_balance", "augment", "balance_power",
          "warm_start", "pretrain_epochs", "n_pool", "n_test")  # fmt: skip


def _number(value: float) -> float | None:
    """Rounded, or None for nan (JSON has no nan)."""
    return None if value != value else round(value, 4)


def by_seed(path: Path) -> dict[int, dict[str, str]]:
    """The rows of ``path`` keyed by seed; ValueError on a seed seen twice."""
    rows: dict[int, dict[str, str]] = {}
    for row in read_rows(path):
        seed = int(row["seed"])
        if seed in rows:
            raise ValueError(f"{path}: seed {seed} appears twice")
        rows[seed] = row
    return rows


def compare(a: Path, b: Path, metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    """Paired statistics of ``b - a`` per metric over the seeds both files hold."""
    rows_a, rows_b = by_seed(a), by_seed(b)
    seeds = sorted(rows_a.keys() & rows_b.keys())
    for seed in seeds:
        differ = [k for k in RECIPE if rows_a[seed].get(k) != rows_b[seed].get(k)]
        if differ:
            raise ValueError(f"seed {seed}: the arms differ in {differ}, not only in their arm")
    report: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
        "loaders": {
            "a": sorted({rows_a[s].get("loader", "") for s in seeds}),
            "b": sorted({rows_b[s].get("loader", "") for s in seeds}),
        },
        "seeds": seeds,
        "unpaired": sorted(rows_a.keys() ^ rows_b.keys()),
        "metrics": {},
    }
    for metric in metrics:
        va = np.array([float(rows_a[s][metric]) for s in seeds])
        vb = np.array([float(rows_b[s][metric]) for s in seeds])
        stat = paired(list(vb - va))
        report["metrics"][metric] = {
            "mean_a": round(float(va.mean()), 4) if seeds else None,
            "mean_b": round(float(vb.mean()), 4) if seeds else None,
            "diffs": [round(float(d), 4) for d in vb - va],
            "mean_diff": _number(stat.mean),
            "ci95": [_number(stat.low), _number(stat.high)],
            "p_t": _number(stat.p_t),
            "p_sign_flip": _number(stat.p_perm),
            "verdict": verdict(stat),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="the baseline arm's CSV")
    p.add_argument("b", type=Path, help="the other arm's CSV")
    p.add_argument("--metric", action="append", help=f"default: {', '.join(METRICS)}")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    report = compare(args.a, args.b, tuple(args.metric or METRICS))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
