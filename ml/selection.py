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
``vaal``                  VAAL (Sinha et al. 2019, :mod:`ml.vaal`): top-B by ``1 - D(mu)``, the
                          discriminator's "unlabeled" score; needs ``images`` [N, H, W, 3]
                          uint8 (the other strategies ignore them); listed by
                          ``strategy_names(images=True)`` only, apart from the feature strategies
========================  =====================================================================

Groups (e.g. HAM10000 ``lesion_id``, one int per pool row, < 0 = none): with ``groups`` no batch
of any strategy holds two rows of one group, and with ``exclude_labeled_groups`` none of a group
that already has a labeled row. The ranking strategies walk their ranking and skip a row whose
group is already picked; ``random`` takes a seeded permutation the same way; the k-center greedy
drops a pick's group mates from its candidates (``ml.kcenter``). ``B'`` is then smaller than the
budget when the groups run out. The wrapper re-checks every strategy's picks against the rule
(a new strategy should still pick through ``_top``, ``_kcenter`` or ``_first_per_group`` to fill
its budget).

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
    groups: np.ndarray | None = None  # int64 [N], < 0 = no group
    eligible: np.ndarray | None = None  # bool [N]: rows outside it are never picked (None: all)
    images: np.ndarray | None = None  # uint8 [N, H, W, 3], for the image strategies (vaal)

    @property
    def unlabeled(self) -> np.ndarray:
        return np.flatnonzero(~self.labeled)

    @property
    def candidates(self) -> np.ndarray:
        """Pool indices that may be picked: unlabeled and eligible."""
        mask = ~self.labeled if self.eligible is None else ~self.labeled & self.eligible
        return np.flatnonzero(mask)


def _first_per_group(groups: np.ndarray | None, order: np.ndarray) -> np.ndarray:
    """``order`` (pool indices, best first) without the rows whose group appeared earlier in it;
    rows of group < 0 are always kept."""
    if groups is None or len(order) == 0:
        return order
    g = groups[order]
    keep = g < 0
    keep[np.unique(g, return_index=True)[1]] = True  # first occurrence of each group id
    return order[keep]


def _groups(
    groups: np.ndarray | None, labeled: np.ndarray, exclude: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(groups int64 [N] or None, eligible bool [N] or None), validated: with ``exclude`` a row
    whose group has a labeled row is not eligible."""
    if groups is None:
        return None, None
    arr = np.asarray(groups)
    if arr.shape != labeled.shape or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"groups must be an int array of shape {labeled.shape}, got {arr.shape}")
    arr = arr.astype(np.int64)
    if not exclude:
        return arr, None
    taken = np.unique(arr[labeled & (arr >= 0)])
    return arr, ~np.isin(arr, taken)


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
    groups: np.ndarray | None = None,
    exclude_labeled_groups: bool = False,
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
        *_groups(groups, lab, exclude_labeled_groups),
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
    """Top-k candidate rows by ``score`` [N], descending, ties to the lowest index, skipping a
    row whose group is already picked."""
    unl = pool.candidates
    k = min(pool.budget if k is None else k, len(unl))
    idx = _first_per_group(pool.groups, unl[np.argsort(-score[unl], kind="stable")])[:k]
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
        eligible=pool.eligible,
        groups=pool.groups,
    )
    return _finish(pool, res.indices, res.min_distance, res.combined)


def _random(pool: _Pool) -> Selection:
    """Uniform sample without replacement, reproducible for a given ``seed``; with groups, the
    first row of each group in a seeded permutation of the candidates."""
    unl, rng = pool.candidates, np.random.default_rng(pool.seed)
    if pool.groups is None:
        idx = rng.choice(unl, size=min(pool.budget, len(unl)), replace=False)
    else:
        idx = _first_per_group(pool.groups, rng.permutation(unl))[: pool.budget]
    return _finish(pool, idx, None, np.full(len(idx), math.nan))


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
    eligible = pool.eligible
    if pool.groups is not None:  # the first half's groups are taken for the second half
        picked = pool.groups[first.indices]
        free = ~np.isin(pool.groups, picked[picked >= 0])
        eligible = free if eligible is None else eligible & free
    rest = _kcenter(
        replace(pool, labeled=labeled, eligible=eligible, budget=pool.budget - len(first.indices)),
        1.0,
    )
    return Selection(
        *(
            np.concatenate([getattr(first, f), getattr(rest, f)])
            for f in ("indices", "min_distance", "predicted_loss", "combined")
        )
    )


def _vaal(pool: _Pool) -> Selection:
    """VAAL (:mod:`ml.vaal`, trained on the pool's images with ``seed``): top-B by the
    discriminator's "unlabeled" score ``1 - D(mu)``."""
    from ml.vaal import vaal_scores  # torch: imported only when asked for

    assert pool.images is not None
    if min(pool.budget, len(pool.candidates)) == 0:  # nothing to pick: no training
        return _top(pool, np.zeros(len(pool.labeled)))
    return _top(pool, vaal_scores(pool.images, pool.labeled, seed=pool.seed, device=pool.device))


def _needs(strategy: str, alpha: float | None) -> str:
    """Inputs ``strategy`` needs: f = features, g = predicted_loss, p = probs."""
    if strategy == "confident_coreset":
        a = DEFAULT_ALPHA if alpha is None else alpha
        return "g" if a == 0.0 else "f" if a == 1.0 else "fg"
    needs = {"random": "", "entropy": "p", "learning_loss": "g", "coreset": "f", "vaal": ""}
    return needs.get(strategy, "fg")


def _keep_group_rule(pool: _Pool, sel: Selection) -> Selection:
    """``sel`` without picks that break the group rule (a no-op for the strategies here, which
    pick by it; a guard for any strategy added later)."""
    if pool.groups is None:
        return sel
    idx = _first_per_group(pool.groups, sel.indices)
    if pool.eligible is not None:
        idx = idx[pool.eligible[idx]]
    if len(idx) == len(sel.indices):
        return sel
    keep = np.isin(sel.indices, idx)
    return Selection(*(getattr(sel, f)[keep] for f in Selection.__dataclass_fields__))


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
        groups: np.ndarray | None = None,
        exclude_labeled_groups: bool = False,
        images: np.ndarray | None = None,
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
            groups,
            exclude_labeled_groups,
        )
        if name in IMAGE_STRATEGIES:
            if images is None:
                raise ValueError(f"strategy {name!r} needs images")
            from ml.vaal import check_images

            pool = replace(pool, images=check_images(images, len(pool.labeled)))
        return _keep_group_rule(pool, run(pool))

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


# Strategies that need the pool's images (``select(..., images=...)``), kept apart so that the
# callers that pass model outputs only (``strategy_names()``: the worker) never meet them.
IMAGE_STRATEGIES: dict[str, Callable[..., Selection]] = {"vaal": _strategy("vaal", _vaal)}


def strategy_names(images: bool = False) -> list[str]:
    """Names of the registered strategies, in registry order; with ``images``, the image
    strategies (``vaal``) after them."""
    return list(STRATEGIES) + (list(IMAGE_STRATEGIES) if images else [])


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
    groups: np.ndarray | None = None,
    exclude_labeled_groups: bool = False,
    images: np.ndarray | None = None,
) -> Selection:
    """Pick the next ``min(budget, #unlabeled)`` pool rows with ``strategy``.

    features: float [N, D] over the whole pool; labeled: bool [N]; predicted_loss: float [N];
    probs: float [N, C] softmax; alpha in [0, 1] (``confident_coreset``: eq. 5 weight, default
    0.25); seed: for ``random``; device: ``cpu`` (numpy) or a torch device for the k-center
    strategies. groups: int [N] group id per row (< 0 = none): no two picks share a group, and
    with ``exclude_labeled_groups`` no pick shares a labeled row's group; fewer than ``budget``
    picks come back when the groups run out. images: uint8 [N, H, W, 3], the pool's images, for
    ``vaal`` (ignored by the others). Raises ValueError for an unknown strategy, a missing or
    malformed input.
    """
    registry = {**STRATEGIES, **IMAGE_STRATEGIES}
    if strategy not in registry:
        known = ", ".join(strategy_names(images=True))
        raise ValueError(f"unknown strategy {strategy!r}; known: {known}")
    return registry[strategy](
        features=features,
        labeled=labeled,
        budget=budget,
        alpha=alpha,
        predicted_loss=predicted_loss,
        probs=probs,
        seed=seed,
        device=device,
        groups=groups,
        exclude_labeled_groups=exclude_labeled_groups,
        images=images,
    )
