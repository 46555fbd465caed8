"""The stopping signal (ml.stopping): agreement between consecutive rounds' predictions, against
sklearn's Cohen's kappa and plain-Python Dice / pixel agreement."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from ml.stopping import cohen_kappa, prediction_agreement


def test_kappa_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for seed in range(200):
        n, c = int(rng.integers(1, 60)), int(rng.integers(2, 8))
        prev = rng.integers(0, c, n)
        flip = rng.random(n) < rng.choice([0.0, 0.1, 0.5, 1.0])
        curr = np.where(flip, rng.integers(0, c, n), prev)
        out = prediction_agreement(prev, curr, c)
        assert out["n"] == n
        assert out["agreement"] == pytest.approx(float(np.mean(prev == curr)))
        if len(set(prev.tolist()) | set(curr.tolist())) == 1:
            assert out["kappa"] == 1.0  # one shared constant class: sklearn's 0/0 (nan)
            continue
        want = cohen_kappa_score(prev, curr, labels=list(range(c)))
        assert out["kappa"] == pytest.approx(want, abs=1e-12), seed


def test_kappa_edges() -> None:
    assert cohen_kappa(np.array([1, 1]), np.array([1, 1]), 3) == 1.0
    assert prediction_agreement(np.zeros(0, int), np.zeros(0, int), 3) == {
        "kappa": None,
        "agreement": None,
        "n": 0,
    }
    # systematic disagreement scores below chance
    out = prediction_agreement(np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0]), 2)
    assert out["kappa"] == pytest.approx(-1.0) and out["agreement"] == 0.0
    with pytest.raises(ValueError, match="class indices"):
        prediction_agreement(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="same shape"):
        prediction_agreement(np.array([0, 1]), np.array([0]), 3)


def test_mask_agreement_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    prev = rng.random((7, 6, 5)) < 0.3
    curr = prev ^ (rng.random((7, 6, 5)) < 0.1)
    prev[0], curr[0] = False, False  # two empty masks: Dice 1
    curr[1] = False  # one empty: Dice 0
    dices, agree = [], []
    for a, b in zip(prev, curr, strict=True):
        both = sum(1 for x, y in zip(a.ravel(), b.ravel(), strict=True) if x and y)
        total = int(a.sum()) + int(b.sum())
        dices.append(1.0 if total == 0 else 2 * both / total)
        agree.append(sum(1 for x, y in zip(a.ravel(), b.ravel(), strict=True) if x == y) / a.size)
    out = prediction_agreement(prev.astype(np.uint8), curr.astype(np.uint8), 2)
    assert out["n"] == 7 and dices[0] == 1.0 and dices[1] == 0.0
    assert out["dice"] == pytest.approx(np.mean(dices))
    assert out["agreement"] == pytest.approx(np.mean(agree))
    assert out["kappa"] == pytest.approx(cohen_kappa_score(prev.ravel(), curr.ravel()))
