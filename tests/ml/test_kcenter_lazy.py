"""The lazy greedy and the pruned initialisation of ml.kcenter against its step-by-step path.

Both are speed-ups that must not change anything: the same picks in the same order, bit-identical
``min_distance`` and ``combined``. The constants are shrunk so that small pools cross every
branch: k-means groups, skipped initialisation blocks, small working sets that run out, blocks
cut short because an outside row fell below min m (the roll-back), and exact fallback steps."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ml.kcenter as kc


@pytest.fixture
def small_consts(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Tiny tiles, groups and working sets; counts the lazy branches taken."""
    for name, value in (
        ("_CB", 7), ("_LB", 5), ("_CHUNK", 6), ("_K", 3), ("_PCA_ROWS", 40), ("_GROUP", 4),
        ("_PB", 9), ("_PRUNE_MIN", 0), ("_KS", 4), ("_KM", 2), ("_BLOCK", 6), ("_LAZY_GROUP", 8),
    ):  # fmt: skip
        monkeypatch.setattr(kc, name, value)
    seen: Counter[str] = Counter()
    sync, exact, pruned = kc._Lazy.sync, kc._Lazy.exact, kc._Greedy._init_pruned

    def counted_sync(self: Any, slots: np.ndarray, c: float) -> int:
        done = sync(self, slots, c)
        seen["rolled_back" if done < len(slots) else "blocks"] += 1
        return done

    def counted_exact(self: Any, t: int, rec: np.ndarray) -> int:
        seen["exact"] += 1
        return exact(self, t, rec)

    def counted_pruned(self: Any, *a: Any) -> None:
        seen["pruned_init"] += 1
        pruned(self, *a)

    monkeypatch.setattr(kc._Lazy, "sync", counted_sync)
    monkeypatch.setattr(kc._Lazy, "exact", counted_exact)
    monkeypatch.setattr(kc._Greedy, "_init_pruned", counted_pruned)
    yield seen


def _pool(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Clustered pool (tight clusters: picks often land close to candidates, so min m moves),
    duplicate rows, tied losses on some seeds, a random eligible mask on some."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(60, 220)), int(rng.integers(8, 24))
    centres = rng.standard_normal((int(rng.integers(2, 8)), d)) * 4
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d)) * rng.choice(
        [0.05, 0.5, 1.0]
    )
    x[rng.integers(0, n, n // 10)] = x[rng.integers(0, n, n // 10)]
    x = x.astype(np.float32) if seed % 2 else x
    labeled = rng.random(n) < rng.choice([0.05, 0.2, 0.5])
    labeled[0] = True
    g = rng.lognormal(size=n)
    g = g.round(0) if seed % 3 == 0 else g
    eligible = rng.random(n) < 0.8 if seed % 5 == 0 else None
    return x, labeled, g, eligible


def _both(x: np.ndarray, labeled: np.ndarray, budget: int, **kw: Any) -> tuple[Any, Any]:
    lazy = kc.confident_kcenter(x, labeled, budget, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kc._Greedy, "lazy_ok", lambda self: False)
        mp.setattr(kc._Greedy, "_prune_init", lambda self, n_c: False)
        plain = kc.confident_kcenter(x, labeled, budget, **kw)
    return lazy, plain


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_lazy_and_pruned_match_the_step_by_step_path(
    small_consts: Counter[str], alpha: float
) -> None:
    for seed in range(40):
        x, labeled, g, eligible = _pool(seed)
        budget = int(np.random.default_rng(seed).integers(1, len(x)))
        kw: dict[str, Any] = {"alpha": alpha, "predicted_loss": g, "eligible": eligible}
        lazy, plain = _both(x, labeled, budget, **kw)
        np.testing.assert_array_equal(lazy.indices, plain.indices, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(lazy.min_distance, plain.min_distance)
        np.testing.assert_array_equal(lazy.combined, plain.combined)
    # every branch ran: blocks, roll-backs, exact fallback steps, the pruned initialisation
    assert small_consts["blocks"] > 0 and small_consts["pruned_init"] > 0
    assert alpha == 1.0 or (small_consts["rolled_back"] > 0 and small_consts["exact"] > 0)


def test_constant_min_distance_and_duplicates(small_consts: Counter[str]) -> None:
    """All candidates at the same distance (every m equal: exact steps) and exact duplicates of
    picks (m falls to 0 mid-block)."""
    rng = np.random.default_rng(7)
    x = np.repeat(rng.standard_normal((20, 10)), 4, axis=0)
    labeled = np.zeros(len(x), dtype=bool)
    labeled[::8] = True
    g = rng.random(len(x))
    for alpha in (0.25, 1.0):
        lazy, plain = _both(x, labeled, 50, alpha=alpha, predicted_loss=g)
        np.testing.assert_array_equal(lazy.indices, plain.indices)
        np.testing.assert_array_equal(lazy.min_distance, plain.min_distance)
        np.testing.assert_array_equal(lazy.combined, plain.combined)


def test_bench_pool_matches_at_a_larger_size() -> None:
    """The benchmark's clustered pool with the real constants (pruned init at a lowered
    threshold), 2,000 rows, 300 picks."""
    from ml.bench import make_pool

    x, labeled, g = make_pool(2000, 96, 400, seed=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kc, "_PRUNE_MIN", 0)
        lazy, plain = _both(x, labeled, 300, alpha=0.25, predicted_loss=g)
    np.testing.assert_array_equal(lazy.indices, plain.indices)
    np.testing.assert_array_equal(lazy.min_distance, plain.min_distance)
    np.testing.assert_array_equal(lazy.combined, plain.combined)
