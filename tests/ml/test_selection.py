"""Selection strategies (ml.selection, ml.kcenter) against brute-force float64 references.

The references evaluate the paper's scores literally over the current candidates: eq. 5
``N(m)^alpha * N(G)^(1-alpha)``, eq. 6 ``N(m) + N(G)`` and the mean-rank fusion, with
``N(v) = (v - min v) / (max v - min v)`` (``N = 1`` for constant ``v``) and ``m`` the min direct
float64 distance to the labeled + already-picked set. Our picks are replayed step by step:
a pick that differs from the reference argmax must be a rounding-level near-tie (reference scores
within 1e-9 relative), and such differences must be rare.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ml.kcenter as kc
from ml.bench import main as bench_main
from ml.bench import run_select_bench
from ml.selection import STRATEGIES, Selection, select, strategy_names

SEEDS = range(50)
Problem = tuple[np.ndarray, np.ndarray, np.ndarray, int]


def _problem(seed: int, n_max: int = 60, d_max: int = 24) -> Problem:
    """Random pool: features (float32 or float64, duplicate rows, various scales and offsets),
    labeled mask (fraction 0 to 0.6), predicted losses (often tied), budget (up to > pool)."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(2, n_max)), int(rng.integers(1, d_max))
    x = rng.standard_normal((n, d)) * rng.choice([1e-3, 1.0, 30.0]) + rng.choice([0.0, 3.0])
    dup = rng.integers(0, n, size=n // 5)
    x[rng.integers(0, n, size=len(dup))] = x[dup]
    x = x.astype(np.float32) if seed % 2 else x
    labeled = rng.random(n) < rng.choice([0.0, 0.1, 0.3, 0.6])
    g = rng.random(n)
    g = g.round(1) if seed % 3 == 0 else g
    return x, labeled, g, int(rng.integers(0, n + 5))


def _norm(v: np.ndarray) -> np.ndarray:
    lo, hi = v.min(), v.max()
    return np.ones_like(v) if hi == lo else (v - lo) / (hi - lo)


def _ref_scores(m: np.ndarray, g: np.ndarray | None, alpha: float, mode: str) -> np.ndarray:
    """Literal scores over the candidates: eq. 5 (product), eq. 6 (sum) or minus mean rank."""
    if mode == "sum":
        assert g is not None
        return _norm(m) + _norm(g)
    if mode == "rank":
        assert g is not None
        rank_m, rank_g = (m[None, :] > m[:, None]).sum(1), (g[None, :] > g[:, None]).sum(1)
        return -(rank_m + rank_g) / 2.0
    if alpha == 1.0 or g is None:
        return _norm(m) ** alpha
    return _norm(m) ** alpha * _norm(g) ** (1.0 - alpha)


def _replay(
    sel: Selection,
    x: np.ndarray,
    labeled: np.ndarray,
    g: np.ndarray | None,
    alpha: float,
    mode: str,
    start: int = 0,
) -> int:
    """Check picks ``start:`` against the reference, step by step; returns the near-tie count."""
    x64 = x.astype(np.float64)
    dist = np.sqrt(((x64[:, None, :] - x64[None, :, :]) ** 2).sum(-1))
    chosen = [int(i) for i in np.flatnonzero(labeled)] + [int(i) for i in sel.indices[:start]]
    cand = sorted({int(i) for i in np.flatnonzero(~labeled)} - set(chosen))
    near = 0
    for t in range(start, len(sel.indices)):
        u, c = int(sel.indices[t]), np.array(cand)
        assert u in cand, f"step {t}: {u} is labeled or already picked"
        k_u = int(np.searchsorted(c, u))
        if not chosen:  # documented seed rule for an empty labeled set
            by_g = g is not None and not (mode == "product" and alpha == 1.0)
            assert u == (c[np.argmax(g[c])] if by_g and g is not None else c[0])
            assert sel.min_distance[t] == math.inf and math.isnan(sel.combined[t])
        else:
            m = dist[np.ix_(c, np.array(chosen))].min(1)
            sc = _ref_scores(m, None if g is None else g[c], alpha, mode)
            k = int(np.argmax(sc))
            if k != k_u:
                near += 1
                assert sc[k_u] >= sc[k] - 1e-9 * abs(sc[k]), (t, u, c[k], sc[k_u], sc[k])
            assert sel.min_distance[t] == pytest.approx(m[k_u], rel=1e-12, abs=1e-300)
            assert sel.combined[t] == pytest.approx(sc[k_u], rel=1e-9, abs=1e-12)
        chosen.append(u)
        cand.remove(u)
    return near


def _check_invariants(sel: Selection, labeled: np.ndarray, budget: int) -> None:
    b = min(budget, int((~labeled).sum()))
    assert sel.indices.dtype == np.int64 and sel.indices.shape == (b,)
    for f in (sel.min_distance, sel.predicted_loss, sel.combined):
        assert f.dtype == np.float64 and f.shape == (b,)
    assert len(set(sel.indices.tolist())) == b and not labeled[sel.indices].any()


KCENTER_CASES = [
    ("coreset", 1.0, "product"),
    ("confident_coreset", 0.25, "product"),
    ("confident_coreset", 0.5, "product"),
    ("confident_coreset", 0.75, "product"),
    ("cc_sum", 0.5, "sum"),
    ("cc_rank", 0.5, "rank"),
]


@pytest.mark.parametrize(("strategy", "alpha", "mode"), KCENTER_CASES)
def test_kcenter_strategies_match_reference(strategy: str, alpha: float, mode: str) -> None:
    near = picks = 0
    for seed in SEEDS:
        x, labeled, g, budget = _problem(seed)
        sel = select(
            strategy, features=x, labeled=labeled, budget=budget, alpha=alpha, predicted_loss=g
        )
        _check_invariants(sel, labeled, budget)
        np.testing.assert_array_equal(sel.predicted_loss, g[sel.indices])
        near += _replay(sel, x, labeled, None if strategy == "coreset" else g, alpha, mode)
        picks += len(sel.indices)
    assert picks > 500 and near <= picks // 200


def test_alpha_zero_and_learning_loss_are_stable_top_b() -> None:
    for seed in SEEDS:
        x, labeled, g, budget = _problem(seed)
        unl = np.flatnonzero(~labeled)
        want = unl[np.argsort(-g[unl], kind="stable")[:budget]]
        for sel in (
            select(
                "learning_loss", features=None, labeled=labeled, budget=budget, predicted_loss=g
            ),
            select(
                "confident_coreset",
                features=x,
                labeled=labeled,
                budget=budget,
                alpha=0.0,
                predicted_loss=g,
            ),
        ):
            np.testing.assert_array_equal(sel.indices, want)
            np.testing.assert_array_equal(sel.combined, g[want])
            assert np.isnan(sel.min_distance).all()


def test_sequential_is_loss_half_then_kcenter() -> None:
    for seed in SEEDS:
        x, labeled, g, budget = _problem(seed)
        sel = select("sequential", features=x, labeled=labeled, budget=budget, predicted_loss=g)
        _check_invariants(sel, labeled, budget)
        unl = np.flatnonzero(~labeled)
        half = min(math.ceil(budget / 2), len(unl))
        by_loss = unl[np.argsort(-g[unl], kind="stable")]
        np.testing.assert_array_equal(sel.indices[:half], by_loss[:half])
        assert _replay(sel, x, labeled, None, 1.0, "product", start=half) <= 1


def test_entropy_random_and_invariants_for_every_strategy() -> None:
    rng = np.random.default_rng(0)
    for seed in range(10):
        x, labeled, g, budget = _problem(seed)
        probs = rng.dirichlet(np.ones(4), size=len(g))
        probs[::3] = probs[0]  # ties
        for name in strategy_names():
            sel = select(
                name,
                features=x,
                labeled=labeled,
                budget=budget,
                predicted_loss=g,
                probs=probs,
                seed=seed,
            )
            _check_invariants(sel, labeled, budget)
        ent = -(probs * np.log(probs)).sum(1)
        unl = np.flatnonzero(~labeled)
        sel = select("entropy", features=None, labeled=labeled, budget=budget, probs=probs)
        np.testing.assert_array_equal(
            sel.indices, unl[np.argsort(-ent[unl], kind="stable")][:budget]
        )
        np.testing.assert_allclose(sel.combined, ent[sel.indices])
        assert np.isnan(sel.predicted_loss).all()


def test_random_is_seeded() -> None:
    labeled = np.zeros(500, dtype=bool)
    labeled[::3] = True
    a, b, c = (
        select("random", features=None, labeled=labeled, budget=40, seed=s) for s in (7, 7, 8)
    )
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    _check_invariants(a, labeled, 40)


def test_budget_larger_than_pool_and_edge_budgets() -> None:
    x, labeled, g, _ = _problem(3)
    for name in ("confident_coreset", "cc_rank", "sequential", "random"):
        sel = select(name, features=x, labeled=labeled, budget=10**6, predicted_loss=g)
        assert sorted(sel.indices.tolist()) == np.flatnonzero(~labeled).tolist()
        assert (
            len(select(name, features=x, labeled=labeled, budget=0, predicted_loss=g).indices) == 0
        )
    everything = np.ones(len(g), dtype=bool)
    assert len(select("coreset", features=x, labeled=everything, budget=5).indices) == 0


def test_empty_labeled_seed_rule_and_constant_loss() -> None:
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((40, 5)), rng.random(40)
    none = np.zeros(40, dtype=bool)
    sel = select("confident_coreset", features=x, labeled=none, budget=5, predicted_loss=g)
    assert sel.indices[0] == np.argmax(g) and sel.min_distance[0] == math.inf
    assert select("coreset", features=x, labeled=none, budget=5).indices[0] == 0
    # constant G: N(G) = 1 for all, so eq. 5 reduces to the distance term (plain k-center)
    labeled = rng.random(40) < 0.3
    flat = select(
        "confident_coreset", features=x, labeled=labeled, budget=20, predicted_loss=np.full(40, 0.3)
    )
    core = select("coreset", features=x, labeled=labeled, budget=20)
    np.testing.assert_array_equal(flat.indices, core.indices)


def test_duplicates_of_labeled_rows_have_distance_exactly_zero() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 700)).astype(np.float32) + 100.0
    x[20:] = x[:10]
    labeled = np.zeros(30, dtype=bool)
    labeled[:10] = True
    sel = select("coreset", features=x, labeled=labeled, budget=20)
    np.testing.assert_array_equal(sel.indices[10:], np.arange(20, 30))
    assert (sel.min_distance[10:] == 0.0).all() and (sel.min_distance[:10] > 0).all()


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Shrink kcenter's tile, chunk and PCA sizes so small problems cross every block edge and
    use the stage-1 projection screen."""
    for name, value in (("_CB", 7), ("_LB", 5), ("_CHUNK", 6), ("_K", 3), ("_PCA_ROWS", 20)):
        monkeypatch.setattr(kc, name, value)
    yield


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_blocked_and_screened_paths_match_reference(tiny_blocks: None, offset: float) -> None:
    near = picks = 0
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        centers = rng.standard_normal((5, 16)) * 3
        x = centers[rng.integers(0, 5, 150)] + rng.standard_normal((150, 16)) + offset
        x = x.astype(np.float32) if seed % 2 else x
        x[140:] = x[:10]
        labeled, g = rng.random(150) < 0.2, rng.random(150)
        for strategy, alpha, mode in KCENTER_CASES[:3]:
            sel = select(
                strategy, features=x, labeled=labeled, budget=60, alpha=alpha, predicted_loss=g
            )
            near += _replay(sel, x, labeled, None if alpha == 1.0 else g, alpha, mode)
            picks += len(sel.indices)
    assert near <= picks // 200


def test_torch_cpu_screened_with_projection_matches_numpy(tiny_blocks: None) -> None:
    pytest.importorskip("torch")
    for seed in range(4):
        rng = np.random.default_rng(200 + seed)
        x = rng.standard_normal((120, 12)).astype(np.float32)
        labeled, g = rng.random(120) < 0.25, rng.random(120)
        a = kc.confident_kcenter(x, labeled, 50, alpha=0.25, predicted_loss=g)
        b = kc.confident_kcenter(x, labeled, 50, alpha=0.25, predicted_loss=g, backend="torch")
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_allclose(a.min_distance, b.min_distance, rtol=1e-12)


@pytest.mark.parametrize("update", ["screened", "dense"])
def test_torch_cpu_matches_numpy(update: str) -> None:
    pytest.importorskip("torch")
    for seed in range(6 if update == "dense" else 12):
        x, labeled, g, budget = _problem(seed, n_max=120, d_max=80)
        for _, alpha, mode in KCENTER_CASES:
            kw = {"alpha": alpha, "predicted_loss": g, "mode": mode}
            a = kc.confident_kcenter(x, labeled, budget, **kw)  # type: ignore[arg-type]
            b = kc.confident_kcenter(x, labeled, budget, **kw, backend="torch", update=update)  # type: ignore[arg-type]
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_allclose(a.min_distance, b.min_distance, rtol=1e-12)
            np.testing.assert_allclose(a.combined, b.combined, rtol=1e-9, equal_nan=True)


def test_errors_are_value_errors() -> None:
    x, labeled, g, _ = _problem(5)
    n = len(g)
    bad: list[tuple[str, dict[str, object], str]] = [
        ("nope", {}, "known: random, entropy"),
        ("coreset", {"features": None}, "needs features"),
        ("confident_coreset", {"predicted_loss": None}, "needs predicted_loss"),
        ("entropy", {}, "needs probs"),
        ("coreset", {"features": x[:-1]}, "features must have shape"),
        ("learning_loss", {"predicted_loss": g[:-1]}, "predicted_loss must have shape"),
        ("entropy", {"probs": np.ones(n)}, "probs must have shape"),
        ("coreset", {"budget": -1}, "budget"),
        ("confident_coreset", {"alpha": 1.5}, "alpha"),
        ("confident_coreset", {"alpha": -0.1}, "alpha"),
        ("coreset", {"labeled": labeled.astype(int)}, "bool mask"),
        ("coreset", {"features": np.full_like(x, np.nan)}, "nan or inf"),
        ("coreset", {"device": "no-such-device"}, "device"),
    ]
    for strategy, override, message in bad:
        kwargs: dict[str, object] = {
            "features": x,
            "labeled": labeled,
            "budget": 3,
            "predicted_loss": g,
            **override,
        }
        with pytest.raises(ValueError, match=message):
            select(strategy, **kwargs)  # type: ignore[arg-type]


def test_registry_and_plain_imports() -> None:
    assert (
        strategy_names()
        == list(STRATEGIES)
        == [
            "random",
            "entropy",
            "coreset",
            "learning_loss",
            "confident_coreset",
            "cc_sum",
            "cc_rank",
            "sequential",
        ]
    )
    code = "import sys, ml.selection, ml.kcenter; assert 'torch' not in sys.modules; "
    code += "assert not [m for m in sys.modules if m.split('.')[0] in ('app', 'worker')]"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_small(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_select_bench(n=3000, dim=64, labeled=300, budget=40, seed=1)
    assert out["same_picks"] is True and out["ours_s"] > 0 and out["reference_s"] > 0
    assert (
        bench_main(
            ["--n", "800", "--dim", "16", "--labeled", "0", "--budget", "5", "--no-reference"]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip())
    assert line["same_picks"] is None and line["n"] == 800


def test_bench_check_cpu_compares_another_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--check-cpu --warmup`` on a device other than cpu (torch on the CPU stands in for CUDA
    here): the CPU path is timed too and must pick the same rows in the same order."""
    pytest.importorskip("torch")
    import ml.bench as mb

    def on(x: np.ndarray, labeled: np.ndarray, budget: int, **kw: Any) -> kc.KCenterResult:
        torch_cpu = kw.pop("device") == "torch-cpu"
        backend = "torch" if torch_cpu else "auto"
        return kc.confident_kcenter(x, labeled, budget, backend=backend, **kw)

    monkeypatch.setattr(mb, "confident_kcenter", on)
    argv = ["--n", "1500", "--dim", "24", "--labeled", "150", "--budget", "60", "--no-reference"]
    assert bench_main([*argv, "--device", "torch-cpu", "--check-cpu", "--warmup"]) == 0
    out = run_select_bench(1500, 24, 150, 60, "torch-cpu", reference=False, check_cpu=True)
    assert out["same_order_as_cpu"] is True and out["cpu_s"] > 0
