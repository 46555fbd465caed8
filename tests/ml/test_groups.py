"""The group constraint of ml.selection (issue 12, item 5): no batch of any strategy holds two rows
of one group, and with ``exclude_labeled_groups`` none of a group that is already labeled.

The k-center strategies are replayed against a brute-force greedy whose candidates, at each step,
are the unlabeled eligible rows whose group has no pick yet (scores from test_selection's literal
references); the ranking strategies against a plain-Python walk of their ranking.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ml.kcenter as kc
import ml.selection as sel_mod
from ml.selection import Selection, select, strategy_names
from tests.ml.test_selection import KCENTER_CASES, _problem, _ref_scores

Grouped = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _grouped(seed: int, n_max: int = 60) -> Grouped:
    """test_selection's random pool plus groups of 1 to 4 rows (about 1 row in 6 ungrouped: -1),
    group ids shuffled so they do not follow the row order."""
    x, labeled, g, budget = _problem(seed, n_max=n_max)
    rng = np.random.default_rng(1000 + seed)
    sizes = rng.integers(1, 5, size=len(g))
    groups = np.repeat(np.arange(len(g)), sizes)[: len(g)]
    groups = rng.permutation(len(g))[groups]  # ids unrelated to position
    groups = rng.permutation(groups)
    groups[rng.random(len(g)) < 0.17] = -1
    return x, labeled, g, groups.astype(np.int64), budget


def _eligible(labeled: np.ndarray, groups: np.ndarray, exclude: bool) -> np.ndarray:
    """Plain-Python eligibility: unlabeled, and (exclude) no labeled row in the same group."""
    taken = {int(groups[i]) for i in range(len(groups)) if labeled[i] and groups[i] >= 0}
    return np.array(
        [not labeled[i] and not (exclude and int(groups[i]) in taken) for i in range(len(groups))]
    )


def _units(rows: list[int], groups: np.ndarray) -> int:
    """How many picks ``rows`` allow: one per group, one per ungrouped row."""
    return len({int(groups[i]) if groups[i] >= 0 else -1 - i for i in rows})


def _check_groups(
    sel: Selection, labeled: np.ndarray, groups: np.ndarray, budget: int, exclude: bool
) -> None:
    """Picks are eligible, distinct, one per group, and as many as the groups allow."""
    eligible = _eligible(labeled, groups, exclude)
    picks = sel.indices.tolist()
    assert len(set(picks)) == len(picks) and all(eligible[i] for i in picks)
    grouped = [int(groups[i]) for i in picks if groups[i] >= 0]
    assert len(grouped) == len(set(grouped)), "two picks share a group"
    assert len(picks) == min(budget, _units(np.flatnonzero(eligible).tolist(), groups))
    for f in (sel.min_distance, sel.predicted_loss, sel.combined):
        assert f.shape == sel.indices.shape


def _replay_groups(
    sel: Selection,
    x: np.ndarray,
    eligible: np.ndarray,
    labeled: np.ndarray,
    groups: np.ndarray,
    g: np.ndarray | None,
    alpha: float,
    mode: str,
    start: int = 0,
) -> int:
    """Brute-force greedy under the group rule, checked step by step from ``start``; returns
    the count of rounding-level near-ties where our pick differs from the reference argmax."""
    x64 = x.astype(np.float64)
    n = len(x64)
    chosen = [i for i in range(n) if labeled[i]] + [int(i) for i in sel.indices[:start]]
    taken = {int(groups[i]) for i in sel.indices[:start] if groups[i] >= 0}
    near = 0
    for t in range(start, len(sel.indices)):
        cand = [
            i
            for i in range(n)
            if eligible[i] and i not in chosen and not (groups[i] >= 0 and groups[i] in taken)
        ]
        u = int(sel.indices[t])
        assert u in cand, f"step {t}: {u} is not a candidate under the group rule"
        k_u = cand.index(u)
        if chosen:
            m = np.array(
                [min(math.sqrt(((x64[i] - x64[j]) ** 2).sum()) for j in chosen) for i in cand]
            )
            sc = _ref_scores(m, None if g is None else g[cand], alpha, mode)
            k = int(np.argmax(sc))
            if k != k_u:
                near += 1
                assert sc[k_u] >= sc[k] - 1e-9 * abs(sc[k]), (t, u, cand[k])
            assert sel.min_distance[t] == pytest.approx(m[k_u], rel=1e-12, abs=1e-300)
        chosen.append(u)
        if groups[u] >= 0:
            taken.add(int(groups[u]))
    return near


def _all_inputs(seed: int) -> tuple[Grouped, np.ndarray]:
    pool = _grouped(seed)
    probs = np.random.default_rng(seed).dirichlet(np.ones(4), size=len(pool[2]))
    return pool, probs


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("strategy", strategy_names())
def test_every_strategy_keeps_one_pick_per_group(strategy: str, exclude: bool) -> None:
    for seed in range(25):
        (x, labeled, g, groups, budget), probs = _all_inputs(seed)
        try:
            sel = select(
                strategy,
                features=x,
                labeled=labeled,
                budget=budget,
                predicted_loss=g,
                probs=probs,
                seed=seed,
                groups=groups,
                exclude_labeled_groups=exclude,
            )
        except ValueError as e:  # a strategy needing inputs this toy pool lacks (e.g. images)
            pytest.skip(f"{strategy}: {e}")
        _check_groups(sel, labeled, groups, budget, exclude)


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize(("strategy", "alpha", "mode"), KCENTER_CASES)
def test_kcenter_under_groups_matches_brute_force(
    strategy: str, alpha: float, mode: str, exclude: bool
) -> None:
    near = picks = 0
    for seed in range(20):
        x, labeled, g, groups, budget = _grouped(seed, n_max=40)
        sel = select(
            strategy,
            features=x,
            labeled=labeled,
            budget=budget,
            alpha=alpha,
            predicted_loss=g,
            groups=groups,
            exclude_labeled_groups=exclude,
        )
        eligible = _eligible(labeled, groups, exclude)
        g_ref = None if strategy == "coreset" else g
        near += _replay_groups(sel, x, eligible, labeled, groups, g_ref, alpha, mode)
        picks += len(sel.indices)
    assert picks > 100 and near <= max(1, picks // 200)


def test_ranking_strategies_walk_their_ranking() -> None:
    for seed in range(25):
        (x, labeled, g, groups, budget), probs = _all_inputs(seed)
        ent = -(probs * np.log(probs)).sum(1)
        for exclude in (False, True):
            eligible = _eligible(labeled, groups, exclude)
            for name, score in (("learning_loss", g), ("entropy", ent)):
                # plain walk: best score first (ties: lower index), skip taken groups
                want: list[int] = []
                taken: set[int] = set()
                for i in sorted(range(len(g)), key=lambda i: (-score[i], i)):
                    if len(want) == budget:
                        break
                    if eligible[i] and not (groups[i] >= 0 and groups[i] in taken):
                        want.append(i)
                        taken.add(int(groups[i]))
                sel = select(
                    name,
                    features=None,
                    labeled=labeled,
                    budget=budget,
                    predicted_loss=g,
                    probs=probs,
                    groups=groups,
                    exclude_labeled_groups=exclude,
                )
                assert sel.indices.tolist() == want


def test_sequential_second_half_avoids_first_half_groups() -> None:
    for seed in range(20):
        x, labeled, g, groups, budget = _grouped(seed, n_max=40)
        sel = select(
            "sequential",
            features=x,
            labeled=labeled,
            budget=budget,
            predicted_loss=g,
            groups=groups,
        )
        _check_groups(sel, labeled, groups, budget, False)
        eligible = _eligible(labeled, groups, False)
        walk = select(
            "learning_loss",
            features=None,
            labeled=labeled,
            budget=math.ceil(budget / 2),
            predicted_loss=g,
            groups=groups,
        )
        assert sel.indices[: len(walk.indices)].tolist() == walk.indices.tolist()
        _replay_groups(sel, x, eligible, labeled, groups, None, 1.0, "product", len(walk.indices))


def test_no_groups_is_unchanged() -> None:
    """groups=None (and all rows ungrouped, for the deterministic strategies) picks exactly what
    the strategies picked before groups existed: their documented rules, checked directly."""
    for seed in range(20):
        (x, labeled, g, groups, budget), probs = _all_inputs(seed)
        unl = np.flatnonzero(~labeled)
        rnd = select("random", features=None, labeled=labeled, budget=budget, seed=seed)
        want = np.random.default_rng(seed).choice(unl, size=min(budget, len(unl)), replace=False)
        np.testing.assert_array_equal(rnd.indices, want)
        top = unl[np.argsort(-g[unl], kind="stable")[:budget]]
        loss = select(
            "learning_loss", features=None, labeled=labeled, budget=budget, predicted_loss=g
        )
        np.testing.assert_array_equal(loss.indices, top)
        ungrouped = np.full(len(g), -1)
        for name in strategy_names():
            if name == "random":
                continue
            kw = {"features": x, "labeled": labeled, "budget": budget, "predicted_loss": g}
            try:
                a = select(name, **kw, probs=probs)  # type: ignore[arg-type]
            except ValueError:
                continue  # a strategy this toy pool cannot feed
            b = select(name, **kw, probs=probs, groups=ungrouped, exclude_labeled_groups=True)  # type: ignore[arg-type]
            for f in ("indices", "min_distance", "predicted_loss", "combined"):
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_kcenter_torch_backend_matches_numpy_with_groups() -> None:
    pytest.importorskip("torch")
    for seed in range(6):
        x, labeled, g, groups, budget = _grouped(seed, n_max=80)
        eligible = _eligible(labeled, groups, True)
        for update in ("screened", "dense"):
            for _, alpha, mode in KCENTER_CASES:
                kw = {"alpha": alpha, "predicted_loss": g, "mode": mode}
                kw |= {"eligible": eligible, "groups": groups}
                a = kc.confident_kcenter(x, labeled, budget, **kw)  # type: ignore[arg-type]
                b = kc.confident_kcenter(x, labeled, budget, **kw, backend="torch", update=update)  # type: ignore[arg-type]
                np.testing.assert_array_equal(a.indices, b.indices)
                np.testing.assert_allclose(a.min_distance, b.min_distance, rtol=1e-12)


def test_a_strategy_that_ignores_groups_is_filtered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry wrapper drops picks that break the rule, whatever the strategy did."""

    def first_rows(pool: sel_mod._Pool) -> Selection:  # ignores groups on purpose
        idx = pool.unlabeled[: pool.budget]
        return sel_mod._finish(pool, idx, None, np.zeros(len(idx)))

    monkeypatch.setitem(sel_mod.STRATEGIES, "rogue", sel_mod._strategy("rogue", first_rows))
    labeled = np.array([True, False, False, False, False, False])
    groups = np.array([7, 7, 3, 3, -1, -1])
    sel = select(
        "rogue",
        features=np.zeros((6, 2)),
        labeled=labeled,
        budget=5,
        predicted_loss=np.zeros(6),
        groups=groups,
        exclude_labeled_groups=True,
    )
    assert sel.indices.tolist() == [2, 4, 5]


def test_group_errors_and_group_exhaustion() -> None:
    labeled = np.zeros(6, dtype=bool)
    with pytest.raises(ValueError, match="groups must be"):
        select("random", features=None, labeled=labeled, budget=2, groups=np.zeros(5, int))
    with pytest.raises(ValueError, match="groups must be"):
        select("random", features=None, labeled=labeled, budget=2, groups=np.zeros(6))
    one_group = np.zeros(6, dtype=np.int64)
    x = np.arange(12.0).reshape(6, 2)
    for name in ("random", "coreset", "learning_loss"):
        got = select(name, features=x, labeled=labeled, budget=4, predicted_loss=x[:, 0])
        assert len(got.indices) == 4
        got = select(
            name, features=x, labeled=labeled, budget=4, predicted_loss=x[:, 0], groups=one_group
        )
        assert len(got.indices) == 1  # the budget shrinks: one group, one pick
    labeled[0] = True
    got = select(
        "coreset",
        features=x,
        labeled=labeled,
        budget=4,
        groups=one_group,
        exclude_labeled_groups=True,
    )
    assert len(got.indices) == 0


def test_image_strategies_keep_the_group_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """vaal ranks by its discriminator's score through the same group-aware walk; the score is
    replaced by a fixed one here (training VAAL is ml.vaal's tests' business)."""
    import ml.vaal

    for seed in range(10):
        _, labeled, g, groups, budget = _grouped(seed)
        score = np.random.default_rng(seed).random(len(g))
        monkeypatch.setattr(ml.vaal, "vaal_scores", lambda *a, score=score, **k: score)
        images = np.zeros((len(g), 4, 4, 3), dtype=np.uint8)
        for name in strategy_names(images=True)[len(strategy_names()) :]:
            for exclude in (False, True):
                sel = select(
                    name,
                    features=None,
                    labeled=labeled,
                    budget=budget,
                    images=images,
                    groups=groups,
                    exclude_labeled_groups=exclude,
                )
                _check_groups(sel, labeled, groups, budget, exclude)
                unl = np.flatnonzero(_eligible(labeled, groups, exclude))
                first = unl[np.argsort(-score[unl], kind="stable")]
                assert sel.indices[:1].tolist() == first[:1].tolist() or budget == 0
