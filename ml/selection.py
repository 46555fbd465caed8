"""Selection strategies for pool-based batch active learning (issue 3), by name.

Every strategy takes the whole pool (labeled and unlabeled rows) and returns the next ``B'`` picks
in pick order, ``B' = min(budget, #unlabeled)``, never a labeled index, never a repeat; ties
always go to the lowest pool index.

========================  =====================================================================
``random``                seeded ``numpy.random.Generator`` sample (``seed``)
``entropy``               top-B softmax entropy ``-sum p log p`` (natural log, ``0 log 0 = 0``)
``learning_loss``         top-B predicted loss (eq. 5 with alpha = 0; Yoo & Kweon 2019)
``coreset``               greedy k-center (eq. 5 with alpha = 1; Sener & Savarese 2018)
``confident_coreset``     confident k-center, eq. 5 / Algorithm 1 (alpha defaults to 0.25)
``cc_sum``                ablation, eq. 6: ``N(m) + N(G)`` (alpha ignored)
``cc_rank``               ablation, rank fusion: min mean rank of ``m`` and ``G`` among the current
                          candidates, recomputed each step (alpha ignored)
``sequential``            ablation: ``min(ceil(B/2), #unlabeled)`` by predicted loss, the rest by
                          plain k-center with those picks added to the labeled set
========================  =====================================================================

The k-center conventions (empty labeled set, constant terms, rank ties) are documented in
:mod:`ml.kcenter`. ``Selection.combined`` holds the score each pick maximised: the eq. 5 / eq. 6
value, minus the mean rank (``cc_rank``), the raw criterion for the ranking strategies (entropy,
predicted loss), ``nan`` for ``random`` and for a k-center seed pick.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ml.kcenter import KCenterResult, Mode, confident_kcenter

DEFAULT_ALPHA = 0.25  # paper, classification (0.5 for segmentation)


@dataclass(frozen=True)
class Selection:
    """Picks in pick order; every field has shape [B'].

    indices: int64 pool indices. min_distance: float64 min Euclidean distance of each pick to
    the labeled + already-picked set when it was picked (``nan`` where not computed, ``inf`` for
    a seed pick on an empty labeled set). predicted_loss: float64 ``G(x)`` of each pick (``nan``
    if none given). combined: float64 score the strategy maximised at that pick."""

    indices: np.ndarray
    min_distance: np.ndarray
    predicted_loss: np.ndarray
    combined: np.ndarray


@dataclass(frozen=True)
class _Pool:
    """Validated inputs: labeled bool [N], features [N, D] | None, g float64 [N] | None,
    probs float64 [N, C] | None."""

    labeled: np.ndarray
    features: np.ndarray | None
    g: np.ndarray | None
    probs: np.ndarray | None
    budget: int
    alpha: float | None
    seed: int
    device: str

    @property
    def unlabeled(self) -> np.ndarray:
        return np.flatnonzero(~self.labeled)


def _finite(name: str, a: np.ndarray | None, ndim: int, n: int) -> np.ndarray | None:
    """``a`` as a finite real array of ``ndim`` dims and ``n`` rows, or a clear ValueError."""
    if a is None:
        return None
    arr = np.asarray(a)
    if arr.ndim != ndim or arr.shape[0] != n:
        want = f"[{n}]" if ndim == 1 else f"[{n}, ...] (2-D)"
        raise ValueError(f"{name} must have shape {want} matching labeled, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains nan or inf")
    return arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float64)


def _validate(
    name: str,
    needs: str,
    features: np.ndarray | None,
    labeled: np.ndarray,
    budget: int,
    alpha: float | None,
    predicted_loss: np.ndarray | None,
    probs: np.ndarray | None,
    seed: int,
    device: str,
) -> _Pool:
    """Check shapes, dtypes, ranges and the inputs strategy ``name`` needs (``needs`` lists
    them: f = features, g = predicted_loss, p = probs)."""
    lab = np.asarray(labeled)
    if lab.ndim != 1 or lab.dtype != np.bool_:
        raise ValueError(f"labeled must be a 1-D bool mask, got {lab.dtype} {lab.shape}")
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if alpha is not None and not (isinstance(alpha, numbers.Real) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    n = lab.shape[0]
    pool = _Pool(
        lab,
        _finite("features", features, 2, n),
        _finite("predicted_loss", predicted_loss, 1, n),
        _finite("probs", probs, 2, n),
        int(budget),
        None if alpha is None else float(alpha),
        int(seed),
        device,
    )
    if pool.probs is not None and (pool.probs < 0).any():
        raise ValueError("probs must be non-negative softmax probabilities")
    given = {"f": pool.features, "g": pool.g, "p": pool.probs}
    label = {"f": "features", "g": "predicted_loss", "p": "probs"}
    missing = [label[k] for k in needs if given[k] is None]
    if missing:
        raise ValueError(f"strategy {name!r} needs {', '.join(missing)}")
    return pool


def _finish(pool: _Pool, idx: np.ndarray, dist: np.ndarray | None, comb: np.ndarray) -> Selection:
    """Wrap picks [B'] with their distances (nan if None), predicted losses and scores."""
    idx = np.asarray(idx, dtype=np.int64)
    g = np.full(len(idx), math.nan) if pool.g is None else pool.g[idx].astype(np.float64)
    dist = np.full(len(idx), math.nan) if dist is None else np.asarray(dist, dtype=np.float64)
    return Selection(idx, dist, g, np.asarray(comb, dtype=np.float64))


def _top(pool: _Pool, score: np.ndarray, k: int | None = None) -> Selection:
    """Top-k unlabeled rows by ``score`` [N], descending, ties to the lowest index."""
    unl = pool.unlabeled
    k = min(pool.budget if k is None else k, len(unl))
    idx = unl[np.argsort(-score[unl], kind="stable")[:k]]
    return _finish(pool, idx, None, score[idx])


def _kcenter(pool: _Pool, alpha: float, mode: Mode = "product") -> Selection:
    """Confident k-center picks (see ml.kcenter) as a Selection."""
    assert pool.features is not None
    res: KCenterResult = confident_kcenter(
        pool.features,
        pool.labeled,
        pool.budget,
        alpha=alpha,
        predicted_loss=pool.g,
        mode=mode,
        device=pool.device,
    )
    return _finish(pool, res.indices, res.min_distance, res.combined)


def _random(pool: _Pool) -> Selection:
    """Uniform sample without replacement, reproducible for a given ``seed``."""
    unl = pool.unlabeled
    k = min(pool.budget, len(unl))
    idx = np.random.default_rng(pool.seed).choice(unl, size=k, replace=False)
    return _finish(pool, idx, None, np.full(k, math.nan))


def _entropy(pool: _Pool) -> Selection:
    """Top-B softmax entropy ``H = -sum_c p_c log p_c`` (probs [N, C])."""
    assert pool.probs is not None
    p = pool.probs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return _top(pool, h)


def _learning_loss(pool: _Pool) -> Selection:
    """Top-B predicted loss (eq. 5 with alpha = 0)."""
    assert pool.g is not None
    return _top(pool, pool.g)


def _confident(pool: _Pool) -> Selection:
    """Eq. 5 / Algorithm 1 with ``alpha`` (default 0.25); alpha 0 and 1 are the two baselines."""
    alpha = DEFAULT_ALPHA if pool.alpha is None else pool.alpha
    return _learning_loss(pool) if alpha == 0.0 else _kcenter(pool, alpha)


def _sequential(pool: _Pool) -> Selection:
    """``min(ceil(B/2), U)`` picks by predicted loss, then plain k-center for the rest with those
    picks counted as labeled (paper section 4.2)."""
    assert pool.g is not None
    first = _top(pool, pool.g, math.ceil(pool.budget / 2))
    labeled = pool.labeled.copy()
    labeled[first.indices] = True
    rest = _kcenter(replace(pool, labeled=labeled, budget=pool.budget - len(first.indices)), 1.0)
    return Selection(
        *(
            np.concatenate([getattr(first, f), getattr(rest, f)])
            for f in ("indices", "min_distance", "predicted_loss", "combined")
        )
    )


def _needs(strategy: str, alpha: float | None) -> str:
    """Inputs ``strategy`` needs: f = features, g = predicted_loss, p = probs."""
    if strategy == "confident_coreset":
        a = DEFAULT_ALPHA if alpha is None else alpha
        return "g" if a == 0.0 else "f" if a == 1.0 else "fg"
    return {"random": "", "entropy": "p", "learning_loss": "g", "coreset": "f"}.get(strategy, "fg")


def _strategy(name: str, run: Callable[[_Pool], Selection]) -> Callable[..., Selection]:
    """Registry entry: ``select``'s keyword signature (without ``strategy``), validating."""

    def strategy(
        *,
        features: np.ndarray | None = None,
        labeled: np.ndarray,
        budget: int,
        alpha: float | None = None,
        predicted_loss: np.ndarray | None = None,
        probs: np.ndarray | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> Selection:
        pool = _validate(
            name,
            _needs(name, alpha),
            features,
            labeled,
            budget,
            alpha,
            predicted_loss,
            probs,
            seed,
            device,
        )
        return run(pool)

    strategy.__name__ = strategy.__qualname__ = name
    strategy.__doc__ = run.__doc__
    return strategy


STRATEGIES: dict[str, Callable[..., Selection]] = {
    name: _strategy(name, run)
    for name, run in [
        ("random", _random),
        ("entropy", _entropy),
        ("coreset", lambda pool: _kcenter(pool, 1.0)),
        ("learning_loss", _learning_loss),
        ("confident_coreset", _confident),
        ("cc_sum", lambda pool: _kcenter(pool, 0.5, "sum")),  # eq. 6: alpha unused
        ("cc_rank", lambda pool: _kcenter(pool, 0.5, "rank")),  # rank fusion: alpha unused
        ("sequential", _sequential),
    ]
}


def strategy_names() -> list[str]:
    """Names of the registered strategies, in registry order."""
    return list(STRATEGIES)


def select(
    strategy: str,
    *,
    features: np.ndarray | None,
    labeled: np.ndarray,
    budget: int,
    alpha: float | None = None,
    predicted_loss: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Selection:
    """Pick the next ``min(budget, #unlabeled)`` pool rows with ``strategy``.

    features: float [N, D] over the whole pool; labeled: bool [N]; predicted_loss: float [N];
    probs: float [N, C] softmax; alpha in [0, 1] (``confident_coreset``: eq. 5 weight, default
    0.25); seed: for ``random``; device: ``cpu`` (numpy) or a torch device for the k-center
    strategies. Raises ValueError for an unknown strategy, a missing or malformed input.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(strategy_names())}")
    return STRATEGIES[strategy](
        features=features,
        labeled=labeled,
        budget=budget,
        alpha=alpha,
        predicted_loss=predicted_loss,
        probs=probs,
        seed=seed,
        device=device,
    )
