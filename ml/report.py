"""Learning curves, labels-needed tables and paired statistics from a simulation CSV.

Statistics (chosen for 3-5 seeds, the paired design of :mod:`ml.simulate`):

- intervals: mean over seeds +- ``t(0.975, n-1) * sd / sqrt(n)`` (Student t, 95%);
- labels needed to reach 95% / 98% of the full-data value: the first labeled fraction reaching
  it, on the mean curve and per seed ("not reached" within the run is kept apart, not imputed);
- strategy vs random: per-seed paired differences (same split, initial set and training seeds),
  their mean, 95% t-interval and a two-sided paired t-test; the exact sign-flip permutation p is
  printed beside it, but with n seeds it cannot go below ``2 / 2**n`` (0.25 at 3 seeds, 0.0625
  at 5), so it cannot flag anything at 0.05 with fewer than 6 seeds; where the differences have
  zero spread (t undefined) the permutation p stands in for the t-test p;
- "significant" = Holm-adjusted paired t-test p < 0.05, Holm over every test in the same table
  (the many strategies x rounds comparisons would otherwise find "wins" in noise).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

if TYPE_CHECKING:
    from matplotlib.axes import Axes

METRICS = {"classification": ("accuracy", "balanced_accuracy"), "segmentation": ("jaccard", "dice")}
LEVELS = (0.95, 0.98)
ALPHA = 0.05
BASELINE = "random"
FULL = "full"

# Curves[strategy][round] = {seed: (fraction, value)}
Curves = dict[str, dict[int, dict[int, tuple[float, float]]]]


@dataclass(frozen=True)
class Paired:
    """A paired comparison over ``n`` seeds: mean difference, its 95% t-interval, the paired
    t-test p and the exact sign-flip permutation p (two-sided)."""

    n: int
    mean: float
    low: float
    high: float
    p_t: float
    p_perm: float


def t_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)``, a 95% Student-t interval; low = high = nan with fewer than 2."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(1 - ALPHA / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, mean - half, mean + half


def permutation_p(diffs: Sequence[float] | np.ndarray) -> float:
    """Exact two-sided sign-flip permutation p of the mean of paired differences."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return math.nan
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    flipped = np.abs((signs * d).mean(axis=1))
    return float(np.mean(flipped >= observed - 1e-12))


def paired(diffs: Sequence[float]) -> Paired:
    """Statistics of per-seed differences (strategy minus baseline).

    With zero spread (common for labels-needed, which moves in whole rounds) the t statistic is
    undefined, not infinite: ``p_t`` is then the exact permutation p (3 seeds all -5 points give
    0.25, not 0)."""
    d = np.asarray(diffs, dtype=np.float64)
    mean, low, high = t_interval(d)
    p_perm = permutation_p(d)
    if len(d) < 2:
        p_t = math.nan
    elif float(d.std(ddof=1)) <= 1e-12 * max(1.0, abs(mean)):
        p_t = p_perm
    else:
        t = mean / (float(d.std(ddof=1)) / math.sqrt(len(d)))
        p_t = float(2 * stats.t.sf(abs(t), len(d) - 1))
    return Paired(len(d), mean, low, high, p_t, p_perm)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values (nan stays nan and does not count as a test)."""
    p = np.asarray(pvalues, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The CSV rows written by :mod:`ml.simulate`."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def curves(rows: list[dict[str, str]], task: str, metric: str) -> Curves:
    """Per strategy, round and seed: ``(labeled fraction, metric)`` (rows with an empty value
    are skipped). The full-data model is strategy ``full``, round 0."""
    out: Curves = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["task"] == task and row.get(metric, "") != "":
            point = (float(row["fraction"]), float(row[metric]))
            out[row["strategy"]][int(row["round"])][int(row["seed"])] = point
    return {s: {r: dict(p) for r, p in rounds.items()} for s, rounds in out.items()}


def round_summary(points: dict[int, tuple[float, float]]) -> tuple[float, float, float, float]:
    """``(mean fraction, mean, low, high)`` over the seeds of one round."""
    fraction = float(np.mean([f for f, _ in points.values()]))
    return (fraction, *t_interval([v for _, v in points.values()]))


def paired_rounds(data: Curves, strategy: str) -> list[tuple[int, float, Paired]]:
    """Per round: ``(round, mean fraction, paired stats of strategy - random)`` over the seeds
    both have."""
    out = []
    for rnd, points in sorted(data[strategy].items()):
        base = data.get(BASELINE, {}).get(rnd, {})
        seeds = sorted(set(points) & set(base))
        if seeds:
            diffs = [points[s][1] - base[s][1] for s in seeds]
            out.append((rnd, float(np.mean([points[s][0] for s in seeds])), paired(diffs)))
    return out


def first_reaching(points: dict[int, tuple[float, float]], target: float) -> float:
    """The smallest labeled fraction whose value is >= target (inf: never reached)."""
    hits = [f for f, v in points.values() if v >= target]
    return min(hits) if hits else math.inf


def labels_needed(data: Curves, strategy: str, level: float) -> tuple[float, dict[int, float]]:
    """Fraction needed to reach ``level`` x full-data: on the mean curve (vs the mean full value)
    and per seed (vs that seed's full value). inf where never reached; nan without full rows.

    Per seed the fraction is the round's nominal one (its mean over seeds): pool sizes differ a
    little between seeds, and differences between strategies must be whole rounds, not noise."""
    full = data.get(FULL, {}).get(0, {})
    if not full:
        return math.nan, {}
    mean_full = float(np.mean([v for _, v in full.values()]))
    rounds = data.get(strategy, {})
    by_round = {r: round_summary(p) for r, p in rounds.items()}
    nominal = {r: f for r, (f, _, _, _) in by_round.items()}
    seeds = sorted({s for points in rounds.values() for s in points} & set(full))
    per_seed = {
        s: first_reaching({r: (nominal[r], p[s][1]) for r, p in rounds.items() if s in p},
                          level * full[s][1])
        for s in seeds
    }  # fmt: skip
    mean_curve = {r: (f, m) for r, (f, m, _, _) in by_round.items()}
    return first_reaching(mean_curve, level * mean_full), per_seed


def _pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage; '—' for nan, 'not reached' for inf."""
    if math.isnan(x):
        return "—"
    return "not reached" if math.isinf(x) else f"{100 * x:.{digits}f}"


def _stat_cells(stat: Paired, p_holm: float) -> list[str]:
    """Markdown cells: mean [CI] (pp), n, p (t), p (perm), p Holm, significant."""
    ci = f"{_pct(stat.mean)} [{_pct(stat.low)}, {_pct(stat.high)}]"
    sig = "yes" if not math.isnan(p_holm) and p_holm < ALPHA else "no"
    return [ci, str(stat.n), f"{stat.p_t:.3g}", f"{stat.p_perm:.3g}", f"{p_holm:.3g}", sig]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


_STAT_HEADER = ["mean diff [95% CI] (pp)", "n", "p (t)", "p (perm)", "p Holm", "significant"]


def curve_table(data: Curves, metric: str) -> list[str]:
    """Markdown: per strategy and round, the mean metric (%) and its 95% interval."""
    rows = []
    for strategy in sorted(data):
        for rnd, points in sorted(data[strategy].items()):
            fraction, mean, low, high = round_summary(points)
            cells = [
                strategy,
                str(rnd),
                _pct(fraction, 1),
                f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]",
            ]
            rows.append([*cells, str(len(points))])
    return _table(["strategy", "round", "% labeled", f"{metric} % [95% CI]", "seeds"], rows)


def paired_round_table(data: Curves, metric: str) -> list[str]:
    """Markdown: per strategy and round, the paired difference to random (Holm over the table)."""
    found = [
        (s, rnd, f, stat)
        for s in sorted(data)
        if s not in (BASELINE, FULL)
        for rnd, f, stat in paired_rounds(data, s)
    ]
    adjusted = holm([stat.p_t for *_, stat in found])
    rows = [
        [s, str(rnd), _pct(f, 1), *_stat_cells(stat, p)]
        for (s, rnd, f, stat), p in zip(found, adjusted, strict=True)
    ]
    return _table(["strategy", "round", "% labeled", *_STAT_HEADER], rows)


def labels_needed_table(data: Curves, metric: str) -> list[str]:
    """Markdown: % of the pool labeled to reach 95% / 98% of full-data ``metric``; per seed and
    on the mean curve, and the paired difference to random (seeds where both reach it)."""
    found = []
    for level, strategy in itertools.product(LEVELS, sorted(s for s in data if s != FULL)):
        mean_curve, per_seed = labels_needed(data, strategy, level)
        _, base = labels_needed(data, BASELINE, level)
        common = [s for s in per_seed if s in base]
        both = [s for s in common if not math.isinf(per_seed[s] + base[s])]
        stat = paired([per_seed[s] - base[s] for s in both]) if strategy != BASELINE else None
        alone = sum(not math.isinf(per_seed[s]) and math.isinf(base[s]) for s in common)
        alone_base = sum(math.isinf(per_seed[s]) and not math.isinf(base[s]) for s in common)
        found.append((level, strategy, mean_curve, per_seed, stat, f"{alone} / {alone_base}"))
    adjusted = iter(holm([f[4].p_t for f in found if f[4] is not None]))
    rows = []
    for level, strategy, mean_curve, per_seed, stat, censored in found:
        seeds = ", ".join(f"{s}: {_pct(v, 1)}" for s, v in per_seed.items())
        cells = [*_stat_cells(stat, next(adjusted)), censored] if stat is not None else [""] * 7
        rows.append([f"{100 * level:g}%", strategy, _pct(mean_curve, 1), seeds, *cells])
    header = ["level", "strategy", "% labeled (mean curve)", "% labeled per seed", *_STAT_HEADER]
    return _table([*header, "seeds reached only by it / only by random"], rows)


def class_recalls(rows: list[dict[str, str]], task: str) -> dict[str, dict[int, dict[str, float]]]:
    """Per strategy and seed, the per-class test recall of its last round (the full-data model:
    round 0). Rows without a ``class_recall`` cell (segmentation, CSVs from before it) are left
    out; a class absent from a seed's test split (null) is left out of that seed."""
    last: dict[tuple[str, int], tuple[int, str]] = {}
    for row in rows:
        cell = row.get("class_recall") or ""
        if row["task"] != task or not cell:
            continue
        key, rnd = (row["strategy"], int(row["seed"])), int(row["round"])
        if key not in last or rnd > last[key][0]:
            last[key] = (rnd, cell)
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for (strategy, seed), (_, cell) in last.items():
        out[strategy][seed] = {c: float(v) for c, v in json.loads(cell).items() if v is not None}
    return dict(out)


def class_recall_table(rows: list[dict[str, str]], task: str) -> list[str]:
    """Markdown: per strategy, the mean over seeds of each class's recall (%) at the last round,
    and the mean paired difference to random (pp); empty when the CSV has no per-class recall."""
    recalls = class_recalls(rows, task)
    if not recalls:
        return []
    classes = sorted({c for seeds in recalls.values() for r in seeds.values() for c in r})
    base = recalls.get(BASELINE, {})
    table = []
    for strategy in sorted(recalls, key=lambda s: (s != FULL, s != BASELINE, s)):
        seeds = recalls[strategy]
        cells = []
        for c in classes:
            values = [r[c] for r in seeds.values() if c in r]
            cell = _pct(float(np.mean(values)), 1) if values else "—"
            diffs = [r[c] - base[s][c] for s, r in seeds.items() if c in r and c in base.get(s, {})]
            if strategy not in (BASELINE, FULL) and diffs:
                cell += f" ({100 * float(np.mean(diffs)):+.1f})"
            cells.append(cell)
        table.append([strategy, str(len(seeds)), *cells])
    return _table(["strategy", "seeds", *classes], table)


def _plot_bands(ax: Axes, data: Curves, metric: str) -> None:
    """One axis: mean curve and 95% band per strategy, the full-data mean as a dashed line."""
    for strategy in sorted(s for s in data if s != FULL):
        summary = np.array([round_summary(p) for _, p in sorted(data[strategy].items())])
        x, mean, low, high = (100 * summary[:, i] for i in range(4))
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=strategy)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
    if FULL in data and 0 in data[FULL]:
        _, full_mean, full_low, full_high = (100 * v for v in round_summary(data[FULL][0]))
        ax.axhline(full_mean, color="black", ls="--", lw=1, label="full data (100%)")
        if not math.isnan(full_low):
            ax.axhspan(full_low, full_high, color="black", alpha=0.08, lw=0)
    ax.set_xlabel("% of the pool labeled")
    ax.set_ylabel(f"{metric} (%)")
    ax.grid(alpha=0.3)


def _plot_diffs(ax: Axes, data: Curves, metric: str) -> None:
    """One axis: mean paired difference to random with its 95% t-band, per strategy."""
    for strategy in sorted(s for s in data if s not in (BASELINE, FULL)):
        found = paired_rounds(data, strategy)
        if not found:
            continue
        x = np.array([100 * f for _, f, _ in found])
        mean, low, high = (
            np.array([100 * getattr(st, k) for *_, st in found]) for k in ("mean", "low", "high")
        )
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=strategy)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(0.0, color="black", lw=1)
    ax.set_xlabel("% of the pool labeled")
    ax.set_ylabel(f"{metric}: strategy - random (pp)")
    ax.grid(alpha=0.3)


def plot_task(rows: list[dict[str, str]], task: str, out_dir: Path) -> list[Path]:
    """Write ``learning-curve-<task>.png`` (mean +- 95% band per metric) and
    ``paired-diff-<task>.png`` (strategy - random, paired by seed, with its 95% band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, draw in (("learning-curve", _plot_bands), ("paired-diff", _plot_diffs)):
        metrics = METRICS[task]
        fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            draw(ax, curves(rows, task, metric), metric)
            ax.set_title(f"{task}: {metric}")
        handles, labels = axes[0][0].get_legend_handles_labels()
        if handles:
            axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{name}-{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def task_section(rows: list[dict[str, str]], task: str) -> list[str]:
    """The markdown section of one task: curves, labels needed, paired per-round differences."""
    lines = [f"## {task}", ""]
    seeds = sorted({int(r["seed"]) for r in rows if r["task"] == task})
    lines += [f"Seeds: {seeds}. Intervals: 95% Student t over seeds. {_TESTS}", ""]
    for metric in METRICS[task]:
        data = curves(rows, task, metric)
        lines += [f"### {metric}: mean over seeds", "", *curve_table(data, metric), ""]
        lines += [f"### {metric}: labels needed (% of the pool)", "", _NEEDED]
        lines += ["", *labels_needed_table(data, metric), ""]
        lines += [f"### {metric}: paired difference to random per round", ""]
        lines += [*paired_round_table(data, metric), ""]
    if table := class_recall_table(rows, task):
        lines += ["### recall per class at the last round (%)", "", _CLASS_RECALL, "", *table, ""]
    return lines


_TESTS = (
    "Differences are paired by seed (same split, initial set and training seeds). 'p (t)' is "
    "the two-sided paired t-test; 'p (perm)' the exact sign-flip permutation test (its floor is "
    "2/2^n: 0.25 at 3 seeds, 0.0625 at 5) and replaces the t-test where the differences have "
    "zero spread; 'significant' means Holm-adjusted p (t) < 0.05 over all tests in that table."
)
_CLASS_RECALL = (
    "Mean over seeds of each class's test recall at the strategy's last round (the full-data "
    "model: its one round); in brackets, the mean paired difference to random in pp. No test: "
    "with a few test images per rare class, one image moves a recall by several points."
)
_NEEDED = (
    "First labeled fraction whose value reaches the level x full-data value: on the mean curve "
    "(vs the mean full-data value) and per seed (vs that seed's full-data model). The difference "
    "to random is in percentage points of the pool, over the seeds where both reach the level "
    "(a negative difference means fewer labels than random)."
)


def build_report(csv_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the PNGs of every task in the CSV; returns the written paths."""
    rows = read_rows(csv_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Active-learning simulation report", "", f"Source: `{csv_path}`.", ""]
    for task in [t for t in METRICS if any(r["task"] == t for r in rows)]:
        written += plot_task(rows, task, out)
        lines += task_section(rows, task)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *written]


def main(argv: Sequence[str] | None = None) -> int:
    """``coreloop report --csv FILE --out DIR``: rebuild the plots and tables from a CSV."""
    parser = argparse.ArgumentParser(prog="coreloop report", description=__doc__.split("\n")[0])
    parser.add_argument("--csv", required=True, type=Path, help="results.csv from simulate")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md and PNGs")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"{args.csv} not found")
    for path in build_report(args.csv, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
