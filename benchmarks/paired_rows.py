"""Two arms of ``benchmarks.learner`` rows, paired by seed: the per-seed differences of each
metric (B minus A) with the project's paired statistics (:func:`ml.report.paired`: mean, 95%
t-interval, t-test and exact sign-flip p) and its verdict (:func:`ml.report.verdict`).

    .venv/bin/python -m benchmarks.paired_rows A.csv B.csv [--metric balanced_accuracy ...]

Prints one JSON object: the seeds paired, and per metric the two arms' means, the differences
and the statistics. Seeds found in one file only are listed and left out; a seed twice in one
file is an error (which run would count?).
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
    report: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
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
            "mean_diff": round(stat.mean, 4),
            "ci95": [round(stat.low, 4), round(stat.high, 4)],
            "p_t": round(stat.p_t, 4),
            "p_sign_flip": round(stat.p_perm, 4),
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
