"""Learning curves, labels-needed tables, paired statistics and the pre-registered endpoints
from a simulation CSV.

Statistics (the paired design of :mod:`ml.simulate`; the protocol is in docs/benchmarks.md,
"Pre-registered protocol"):

- intervals: mean over seeds +- ``t(0.975, n-1) * sd / sqrt(n)`` (Student t, 95%);
- labels needed to reach a target: the smallest labeled fraction from which the curve stays at
  or above the target in every later round (a curve that crosses and falls back has not
  reached it there); on the mean curve and per seed ("not reached" within the run is kept
  apart, not imputed);
- strategy vs random: per-seed paired differences (same split, initial set and training seeds),
  their mean, 95% t-interval, a two-sided paired t-test and the exact sign-flip permutation p
  (its floor is ``2 / 2**n``: 0.25 at 3 seeds, 0.0625 at 5, 0.031 at 6); where the differences
  have zero spread (t undefined) the permutation p stands in for the t-test p;
- a test over fewer than :data:`MIN_SEEDS` seeds is never called significant, whatever its p;
- the **primary endpoint** (:func:`primary_endpoint`): per seed, the metric of the arm minus
  random averaged over the rounds from 10% to 30% labeled (the area under the learning curve);
  significant when ``n >= MIN_SEEDS`` and both the paired t-test p and the sign-flip p are below
  0.05 (two-sided). Its secondary endpoints use the same rule;
- every other table holds many comparisons: it is marked exploratory, and its "significant"
  column means Holm-adjusted paired t-test p < 0.05 over the tests of that table (and n >= 5);
- the labeled set's class composition (the ``class_counts`` column, or the selection sidecars
  plus the data's labels) is printed beside each curve as the majority class's share.
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
TASK_OF = {m: task for task, metrics in METRICS.items() for m in metrics}
LEVELS = (0.95, 0.98)
ALPHA = 0.05
MIN_SEEDS = 5  # fewer seeds: never "significant" (the sign-flip p cannot go below 2 / 2**n)
BASELINE = "random"
FULL = "full"
# The pre-registered primary endpoint (docs/benchmarks.md, "Pre-registered protocol").
PRIMARY_ARM = "confident_coreset"
PRIMARY_METRIC = "balanced_accuracy"
AULC_RANGE = (0.10, 0.30)
NOMINAL_TOLERANCE = 0.005  # a round's mean fraction may miss its nominal value by this much
NOT_TESTABLE = f"n < {MIN_SEEDS} seeds: not testable"

# Curves[strategy][round] = {seed: (fraction, value)}
Curves = dict[str, dict[int, dict[int, tuple[float, float]]]]
# Compositions[strategy][round] = {seed: {class: count of the labeled set}}
Compositions = dict[str, dict[int, dict[int, dict[str, int]]]]


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


@dataclass(frozen=True)
class Endpoint:
    """A pre-registered endpoint, arm minus baseline, per seed and over seeds.

    per_seed: the difference of each seed where both arms have every round needed (for
    ``labels_to_reach``: where the arm reaches the target; ``censored`` lists the others).
    rounds: the rounds averaged (area under the learning curve), empty for labels_to_reach."""

    name: str
    task: str
    metric: str
    arm: str
    baseline: str
    rounds: tuple[int, ...]
    per_seed: dict[int, float]
    stat: Paired
    censored: tuple[int, ...] = ()

    @property
    def verdict(self) -> str:
        return verdict(self.stat)


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


def testable(stat: Paired) -> bool:
    """Whether a paired test over ``stat.n`` seeds may be called significant at all."""
    return stat.n >= MIN_SEEDS


def verdict(stat: Paired) -> str:
    """The pre-registered rule: significant when ``n >= MIN_SEEDS`` and both the paired t-test
    p and the exact sign-flip p are below ALPHA (two-sided)."""
    if not testable(stat):
        return NOT_TESTABLE
    if stat.p_t < ALPHA and stat.p_perm < ALPHA:
        return "significant"
    if stat.p_t < ALPHA:
        return "not significant (t-test p < 0.05, sign-flip p is not)"
    return "not significant"


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
    """The smallest labeled fraction from which the value stays >= target in every later round
    (inf: the last round is below target). A crossing followed by a fall below the target does
    not count: a noisy curve would otherwise "reach" a level it does not hold."""
    reached = math.inf
    for fraction, value in sorted(points.values(), reverse=True):
        if value < target:
            break
        reached = fraction
    return reached


def nominal_fractions(data: Curves, strategy: str) -> dict[int, float]:
    """Each round's nominal fraction: its mean over seeds (pool sizes differ a little between
    seeds, and differences between strategies must be whole rounds, not noise)."""
    return {r: round_summary(p)[0] for r, p in data.get(strategy, {}).items()}


def seed_curve(data: Curves, strategy: str, seed: int) -> dict[int, tuple[float, float]]:
    """One seed's curve with nominal fractions: ``{round: (fraction, value)}``."""
    nominal = nominal_fractions(data, strategy)
    rounds = data.get(strategy, {})
    return {r: (nominal[r], p[seed][1]) for r, p in rounds.items() if seed in p}


def labels_needed(data: Curves, strategy: str, level: float) -> tuple[float, dict[int, float]]:
    """Fraction needed to reach ``level`` x full-data for good (see :func:`first_reaching`): on
    the mean curve (vs the mean full value) and per seed (vs that seed's full value), with
    nominal fractions. inf where never reached; nan without full rows."""
    full = data.get(FULL, {}).get(0, {})
    if not full:
        return math.nan, {}
    mean_full = float(np.mean([v for _, v in full.values()]))
    rounds = data.get(strategy, {})
    seeds = sorted({s for points in rounds.values() for s in points} & set(full))
    per_seed = {s: first_reaching(seed_curve(data, strategy, s), level * full[s][1]) for s in seeds}
    mean_curve = {r: round_summary(p)[:2] for r, p in rounds.items()}
    return first_reaching(mean_curve, level * mean_full), per_seed


# --- pre-registered endpoints ----------------------------------------------------------------


def _aulc_rounds(data: Curves, baseline: str, lo: float, hi: float) -> tuple[int, ...]:
    """The baseline's rounds whose nominal fraction lies in [lo, hi]."""
    nominal = nominal_fractions(data, baseline)
    tol = NOMINAL_TOLERANCE
    return tuple(sorted(r for r, f in nominal.items() if lo - tol <= f <= hi + tol))


def primary_endpoint(
    rows: list[dict[str, str]],
    arm: str = PRIMARY_ARM,
    baseline: str = BASELINE,
    metric: str = PRIMARY_METRIC,
    lo: float = AULC_RANGE[0],
    hi: float = AULC_RANGE[1],
) -> Endpoint:
    """Per seed: the mean over the rounds from ``lo`` to ``hi`` labeled (nominal fractions, both
    ends included; every round weighs the same) of ``metric`` of ``arm`` minus ``baseline``: the
    area under the learning curve over that range, divided by its width for equally spaced
    rounds. A seed counts only where both arms have every one of those rounds; the paired
    statistics are over those seeds."""
    task = TASK_OF[metric]
    data = curves(rows, task, metric)
    rounds = _aulc_rounds(data, baseline, lo, hi)
    a, b = data.get(arm, {}), data.get(baseline, {})
    seeds = sorted({s for r in rounds for s in b.get(r, {})})
    per_seed = {
        s: float(np.mean([a[r][s][1] - b[r][s][1] for r in rounds]))
        for s in seeds
        if rounds and all(s in a.get(r, {}) and s in b.get(r, {}) for r in rounds)
    }
    name = f"{metric}, mean over {100 * lo:g}-{100 * hi:g}% labeled"
    return Endpoint(name, task, metric, arm, baseline, rounds, per_seed,
                    paired(list(per_seed.values())))  # fmt: skip


def labels_to_reach_endpoint(
    rows: list[dict[str, str]],
    arm: str = PRIMARY_ARM,
    baseline: str = BASELINE,
    metric: str = PRIMARY_METRIC,
) -> Endpoint:
    """Per seed: the labeled fraction the arm needs to reach, for good, the baseline's value at
    its last round, minus the fraction the baseline needs (at most its last round; earlier where
    it already stays at or above its final value). Negative: fewer labels than the baseline. A
    seed where the arm does not reach it within the run is censored (listed, not imputed)."""
    task = TASK_OF[metric]
    data = curves(rows, task, metric)
    b = data.get(baseline, {})
    seeds = sorted({s for points in b.values() for s in points})
    per_seed: dict[int, float] = {}
    censored = []
    for s in seeds:
        base_curve = seed_curve(data, baseline, s)
        arm_curve = seed_curve(data, arm, s)
        if not arm_curve:
            continue
        target = base_curve[max(base_curve)][1]
        reached = first_reaching(arm_curve, target)
        if math.isinf(reached):
            censored.append(s)
        else:
            per_seed[s] = reached - first_reaching(base_curve, target)
    name = f"labels to reach {baseline}'s final {metric} (% of the pool)"
    return Endpoint(name, task, metric, arm, baseline, (), per_seed,
                    paired(list(per_seed.values())), tuple(censored))  # fmt: skip


def preregistered_endpoints(rows: list[dict[str, str]], arm: str = PRIMARY_ARM) -> list[Endpoint]:
    """The primary endpoint and the secondary ones for ``arm`` (those the CSV has data for):
    balanced accuracy AULC (primary), accuracy AULC, labels to reach random's final balanced
    accuracy, segmentation's Jaccard AULC."""
    found = [
        primary_endpoint(rows, arm),
        primary_endpoint(rows, arm, metric="accuracy"),
        labels_to_reach_endpoint(rows, arm),
        primary_endpoint(rows, arm, metric="jaccard"),
    ]
    return [e for e in found if e.per_seed or e.censored]


# --- labeled-set composition -----------------------------------------------------------------


def compositions(rows: list[dict[str, str]], task: str) -> Compositions:
    """Per strategy, round and seed: the class counts of the labeled set (the ``class_counts``
    JSON column; the full-data model: the whole pool). Rows without it are left out."""
    out: Compositions = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        cell = row.get("class_counts") or ""
        if row["task"] == task and cell:
            counts = {c: int(v) for c, v in json.loads(cell).items()}
            out[row["strategy"]][int(row["round"])][int(row["seed"])] = counts
    return {s: {r: dict(p) for r, p in rounds.items()} for s, rounds in out.items()}


def majority_class(comps: Compositions) -> str | None:
    """The class with the most labels summed over every row (nv on HAM10000); None if empty."""
    total: dict[str, int] = defaultdict(int)
    for rounds in comps.values():
        for points in rounds.values():
            for counts in points.values():
                for c, n in counts.items():
                    total[c] += n
    return max(sorted(total), key=lambda c: total[c]) if total else None


def share_curves(rows: list[dict[str, str]], task: str, cls: str) -> Curves:
    """Like :func:`curves`, with the share of class ``cls`` in the labeled set as the value."""
    out: Curves = defaultdict(lambda: defaultdict(dict))
    comps = compositions(rows, task)
    fraction = {(r["strategy"], int(r["round"]), int(r["seed"])): float(r["fraction"])
                for r in rows if r["task"] == task}  # fmt: skip
    for strategy, rounds in comps.items():
        for rnd, points in rounds.items():
            for seed, counts in points.items():
                n = sum(counts.values())
                if n:
                    key = (strategy, rnd, seed)
                    out[strategy][rnd][seed] = (fraction[key], counts.get(cls, 0) / n)
    return {s: {r: dict(p) for r, p in rounds.items()} for s, rounds in out.items()}


def class_counts_cell(classes: Sequence[str], labels: np.ndarray) -> str:
    """The ``class_counts`` cell of a labeled set: ``{"akiec":12,...,"nv":540}`` (every class,
    zeros included), compact JSON. ``labels``: int class indices into ``classes``."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return json.dumps({c: int(n) for c, n in zip(classes, counts, strict=True)},
                      separators=(",", ":"))  # fmt: skip


def add_class_counts(
    rows: list[dict[str, str]],
    selections: Path,
    labels: np.ndarray,
    classes: Sequence[str],
    task: str = "classification",
) -> int:
    """Fill an empty ``class_counts`` cell of each ``task`` row (not ``full``) from the picks in
    ``selections/<task>-<strategy>-seed<k>.json`` (the initial set and each round's data rows)
    and ``labels`` [data rows]; returns how many cells were filled. A round whose stored picks
    do not add up to its ``labels`` count raises ValueError (wrong data or --limit)."""
    cache: dict[Path, dict[str, list[int]]] = {}
    filled = 0
    for row in rows:
        if row["task"] != task or row["strategy"] == FULL or row.get("class_counts"):
            continue
        path = selections / f"{task}-{row['strategy']}-seed{row['seed']}.json"
        if path not in cache:
            cache[path] = json.loads(path.read_text()) if path.is_file() else {}
        picks, rnd = cache[path], int(row["round"])
        if not all(str(r) in picks for r in range(rnd + 1)):
            continue
        taken = np.concatenate([np.asarray(picks[str(r)], dtype=np.int64) for r in range(rnd + 1)])
        if len(taken) != int(row["labels"]) or (len(taken) and taken.max() >= len(labels)):
            raise ValueError(f"{path}: round {rnd} picks do not match the CSV or the data")
        row["class_counts"] = class_counts_cell(classes, labels[taken])
        filled += 1
    return filled


# --- markdown --------------------------------------------------------------------------------


def _pct(x: float, digits: int = 2) -> str:
    """A fraction as a percentage; '—' for nan, 'not reached' for inf."""
    if math.isnan(x):
        return "—"
    return "not reached" if math.isinf(x) else f"{100 * x:.{digits}f}"


def _significant(stat: Paired, p_holm: float) -> str:
    """The exploratory tables' flag: Holm p < 0.05 over the table, never below MIN_SEEDS."""
    if not testable(stat):
        return NOT_TESTABLE
    return "yes" if not math.isnan(p_holm) and p_holm < ALPHA else "no"


def _stat_cells(stat: Paired, p_holm: float) -> list[str]:
    """Markdown cells: mean [CI] (pp), n, p (t), p (perm), p Holm, significant."""
    ci = f"{_pct(stat.mean)} [{_pct(stat.low)}, {_pct(stat.high)}]"
    cells = [f"{stat.p_t:.3g}", f"{stat.p_perm:.3g}", f"{p_holm:.3g}"]
    return [ci, str(stat.n), *cells, _significant(stat, p_holm)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def exploratory_note(tests: int) -> list[str]:
    """The mark of a table with many comparisons (none for a table of one test or none)."""
    if tests < 2:
        return []
    note = (
        f"**Exploratory** ({tests} comparisons in this table, Holm-adjusted within it): "
        "not the pre-registered endpoint; read a 'yes' as a lead, not a finding."
    )
    return [note, ""]


_STAT_HEADER = ["mean diff [95% CI] (pp)", "n", "p (t)", "p (perm)", "p Holm", "significant"]


def curve_table(data: Curves, metric: str, shares: Curves | None = None,
                majority: str | None = None) -> list[str]:  # fmt: skip
    """Markdown: per strategy and round, the mean metric (%) and its 95% interval; with
    ``shares``, the mean share of the ``majority`` class in the labeled set beside it."""
    rows = []
    for strategy in sorted(data):
        for rnd, points in sorted(data[strategy].items()):
            fraction, mean, low, high = round_summary(points)
            cells = [
                strategy,
                str(rnd),
                _pct(fraction, 1),
                f"{_pct(mean)} [{_pct(low)}, {_pct(high)}]",
                str(len(points)),
            ]
            if shares is not None:
                share = shares.get(strategy, {}).get(rnd)
                cells.append(_pct(round_summary(share)[1], 1) if share else "—")
            rows.append(cells)
    header = ["strategy", "round", "% labeled", f"{metric} % [95% CI]", "seeds"]
    if shares is not None:
        header.append(f"{majority} % of labeled set")
    return _table(header, rows)


def paired_round_table(data: Curves, metric: str) -> list[str]:
    """Markdown: per strategy and round, the paired difference to random (Holm over the table),
    marked exploratory."""
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
    tests = sum(not math.isnan(p) for p in adjusted)
    return [*exploratory_note(tests), *_table(["strategy", "round", "% labeled", *_STAT_HEADER],
                                              rows)]  # fmt: skip


def labels_needed_table(data: Curves, metric: str) -> list[str]:
    """Markdown: % of the pool labeled to reach 95% / 98% of full-data ``metric`` for good; per
    seed and on the mean curve, and the paired difference to random (seeds where both reach
    it), marked exploratory."""
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
    pvalues = holm([f[4].p_t for f in found if f[4] is not None])
    adjusted = iter(pvalues)
    rows = []
    for level, strategy, mean_curve, per_seed, stat, censored in found:
        seeds = ", ".join(f"{s}: {_pct(v, 1)}" for s, v in per_seed.items())
        cells = [*_stat_cells(stat, next(adjusted)), censored] if stat is not None else [""] * 7
        rows.append([f"{100 * level:g}%", strategy, _pct(mean_curve, 1), seeds, *cells])
    header = ["level", "strategy", "% labeled (mean curve)", "% labeled per seed", *_STAT_HEADER]
    table = _table([*header, "seeds reached only by it / only by random"], rows)
    return [*exploratory_note(sum(not math.isnan(p) for p in pvalues)), *table]


def composition_table(rows: list[dict[str, str]], task: str) -> list[str]:
    """Markdown: per strategy, each class's share (%) of the labeled set at its last round, mean
    over seeds; empty without ``class_counts``."""
    comps = compositions(rows, task)
    if not comps:
        return []
    classes = sorted({c for rounds in comps.values() for p in rounds.values()
                      for counts in p.values() for c in counts})  # fmt: skip
    table = []
    for strategy in sorted(comps, key=lambda s: (s != FULL, s != BASELINE, s)):
        last = comps[strategy][max(comps[strategy])]
        shares = [{c: counts.get(c, 0) / max(1, sum(counts.values())) for c in classes}
                  for counts in last.values()]  # fmt: skip
        cells = [_pct(float(np.mean([s[c] for s in shares])), 1) for c in classes]
        table.append([strategy, str(max(comps[strategy])), str(len(last)), *cells])
    return _table(["strategy", "round", "seeds", *classes], table)


def endpoint_rows(endpoints: list[Endpoint]) -> list[list[str]]:
    """Markdown rows of endpoints: name, task, arm, per-seed differences, n, mean [CI], p (t),
    p (sign-flip), verdict."""
    out = []
    for e in endpoints:
        seeds = ", ".join(f"{s}: {100 * v:+.2f}" for s, v in sorted(e.per_seed.items()))
        if e.censored:
            censored = f"not reached: {', '.join(map(str, e.censored))}"
            seeds = f"{seeds}; {censored}" if seeds else censored
        ci = f"{_pct(e.stat.mean)} [{_pct(e.stat.low)}, {_pct(e.stat.high)}]"
        p = [f"{e.stat.p_t:.3g}", f"{e.stat.p_perm:.3g}"]
        out.append([e.name, e.task, f"{e.arm} − {e.baseline}", seeds, str(e.stat.n), ci, *p,
                    e.verdict])  # fmt: skip
    return out


_ENDPOINT_HEADER = ["endpoint", "task", "arms", "per seed (pp)", "n", "mean [95% CI] (pp)",
                    "p (t)", "p (sign-flip)", "verdict"]  # fmt: skip


def endpoint_section(rows: list[dict[str, str]]) -> list[str]:
    """The report's opening: the pre-registered primary endpoint, its secondary endpoints, and
    the same endpoints for every other arm vs random (exploratory). Empty without random."""
    if not any(r["strategy"] == BASELINE for r in rows):
        return []
    lines = ["## Pre-registered endpoints", "", _ENDPOINTS, ""]
    mine = preregistered_endpoints(rows)
    if mine:
        primary, secondary = mine[:1], mine[1:]
        if primary[0].metric != PRIMARY_METRIC:  # no classification rows: all secondary
            primary, secondary = [], mine
        if primary:
            lines += ["### Primary", "", *_table(_ENDPOINT_HEADER, endpoint_rows(primary)), ""]
        if secondary:
            lines += ["### Secondary", "", *_table(_ENDPOINT_HEADER, endpoint_rows(secondary))]
            lines.append("")
    others = sorted({r["strategy"] for r in rows} - {BASELINE, FULL, PRIMARY_ARM})
    found = [e for arm in others for e in preregistered_endpoints(rows, arm)]
    if found:
        lines += ["### Other arms vs random", "", *exploratory_note(len(found))]
        lines += [*_table(_ENDPOINT_HEADER, endpoint_rows(found)), ""]
    return lines


# --- plots -----------------------------------------------------------------------------------


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
    """Write ``learning-curve-<task>.png`` (mean +- 95% band per metric, and the majority
    class's share of the labeled set where the CSV has it) and ``paired-diff-<task>.png``
    (strategy - random, paired by seed, with its 95% band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    majority = majority_class(compositions(rows, task))
    written = []
    for name, draw in (("learning-curve", _plot_bands), ("paired-diff", _plot_diffs)):
        panels = [(m, curves(rows, task, m)) for m in METRICS[task]]
        if name == "learning-curve" and majority is not None:
            panels.append(
                (f"{majority} share of the labeled set", share_curves(rows, task, majority))
            )
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (metric, data) in zip(axes[0], panels, strict=True):
            draw(ax, data, metric)
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
    """The markdown section of one task: curves (with the labeled set's majority-class share),
    labels needed, paired per-round differences, composition and recall per class."""
    lines = [f"## {task}", ""]
    seeds = sorted({int(r["seed"]) for r in rows if r["task"] == task})
    lines += [f"Seeds: {seeds}. Intervals: 95% Student t over seeds. {_TESTS}", ""]
    majority = majority_class(compositions(rows, task))
    shares = share_curves(rows, task, majority) if majority is not None else None
    for metric in METRICS[task]:
        data = curves(rows, task, metric)
        lines += [f"### {metric}: mean over seeds", ""]
        lines += [*curve_table(data, metric, shares, majority), ""]
        lines += [f"### {metric}: labels needed (% of the pool)", "", _NEEDED]
        lines += ["", *labels_needed_table(data, metric), ""]
        lines += [f"### {metric}: paired difference to random per round", ""]
        lines += [*paired_round_table(data, metric), ""]
    if table := composition_table(rows, task):
        lines += ["### labeled set per class at the last round (% of it)", "", _COMPOSITION, ""]
        lines += [*table, ""]
    if table := class_recall_table(rows, task):
        lines += ["### recall per class at the last round (%)", "", _CLASS_RECALL, "", *table, ""]
    return lines


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


_TESTS = (
    "Differences are paired by seed (same split, initial set and training seeds). 'p (t)' is "
    "the two-sided paired t-test; 'p (perm)' the exact sign-flip permutation test (its floor is "
    "2/2^n: 0.25 at 3 seeds, 0.0625 at 5, 0.031 at 6) and replaces the t-test where the "
    "differences have zero spread; 'significant' means Holm-adjusted p (t) < 0.05 over all tests "
    f"in that table. A test over fewer than {MIN_SEEDS} seeds is never called significant."
)
_ENDPOINTS = (
    "Fixed before the run (docs/benchmarks.md, 'Pre-registered protocol'). Per seed: the arm's "
    "metric minus random's, averaged over the rounds from 10% to 30% labeled (area under the "
    "learning curve); labels to reach: the fraction from which the arm stays at or above "
    "random's final value, minus random's. Over seeds: mean, 95% t-interval, two-sided paired "
    "t-test and exact sign-flip p. Verdict: 'significant' needs at least "
    f"{MIN_SEEDS} seeds and both p < {ALPHA}. The primary endpoint is confident_coreset − random "
    "in balanced accuracy; everything else is secondary or exploratory."
)
_COMPOSITION = (
    "Mean over seeds of each class's share of the labeled set at the strategy's last round (the "
    "full-data model: the whole pool). A balanced-accuracy gain that comes with a lower majority "
    "share may be the rebalancing, not the selection as such."
)
_CLASS_RECALL = (
    "Mean over seeds of each class's test recall at the strategy's last round (the full-data "
    "model: its one round); in brackets, the mean paired difference to random in pp. No test: "
    "with a few test images per rare class, one image moves a recall by several points."
)
_NEEDED = (
    "Smallest labeled fraction from which the value stays at or above the level x full-data "
    "value in every later round (a crossing followed by a fall below does not count): on the "
    "mean curve (vs the mean full-data value) and per seed (vs that seed's full-data model). The "
    "difference to random is in percentage points of the pool, over the seeds where both reach "
    "the level (a negative difference means fewer labels than random)."
)


def labels_from_data(data: Path, limit: int | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The class of every data row (classification, metadata order; ``limit`` as the run used)
    and the class names."""
    from ml.ham10000 import task_index

    index = task_index(data, "classification", limit=limit)
    return index.labels, index.classes


def build_report(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    selections: str | Path | None = None,
    data: str | Path | None = None,
    limit: int | None = None,
) -> list[Path]:
    """Write ``report.md`` and the PNGs of every task in the CSV; returns the written paths.

    With ``data`` (the HAM10000 folder the run used, and its ``limit``), classification rows
    without a ``class_counts`` cell get one from the picks in ``selections`` (default: the
    ``selections`` folder beside the CSV)."""
    rows = read_rows(csv_path)
    if data is not None:
        labels, classes = labels_from_data(Path(data), limit)
        folder = (
            Path(selections) if selections is not None else Path(csv_path).parent / "selections"
        )
        add_class_counts(rows, folder, labels, classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Active-learning simulation report", "", f"Source: `{csv_path}`.", ""]
    lines += endpoint_section(rows)
    for task in [t for t in METRICS if any(r["task"] == t for r in rows)]:
        written += plot_task(rows, task, out)
        lines += task_section(rows, task)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *written]


def main(argv: Sequence[str] | None = None) -> int:
    """``coreloop report --csv FILE --out DIR [--data DIR [--selections DIR] [--limit N]]``:
    rebuild the plots and tables from a CSV."""
    parser = argparse.ArgumentParser(prog="coreloop report", description=__doc__.split("\n")[0])
    parser.add_argument("--csv", required=True, type=Path, help="results.csv from simulate")
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md and PNGs")
    parser.add_argument("--data", type=Path,
                        help="the run's HAM10000 folder: labeled-set composition from the picks "
                             "where the CSV has no class_counts column")  # fmt: skip
    parser.add_argument(
        "--selections", type=Path, help="folder of the picks (default: selections/ beside the CSV)"
    )
    parser.add_argument("--limit", type=int, help="the run's --limit, with --data")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        parser.error(f"{args.csv} not found")
    try:
        paths = build_report(args.csv, args.out, selections=args.selections, data=args.data,
                             limit=args.limit)  # fmt: skip
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
