"""Cold start: round 0's initial set picked in an embedding instead of at random (issue 12).

- :func:`typiclust` (Hacohen, Dekel, Weinshall, "Active Learning on a Budget", ICML 2022):
  k-means into ``budget`` clusters; from each cluster, largest first, the most *typical* point,
  typicality(x) = 1 / (mean distance to its k nearest neighbours + 1e-5), computed inside the
  cluster with ``k = min(k_neighbors, size // 2)`` and clusters under 5 points skipped while
  larger ones remain (both as in the authors' code).
- :func:`probcover` (Yehuda, Dekel, Hacohen, Weinshall, "Active Learning Through a Covering
  Lens", NeurIPS 2022): greedy max coverage of delta-balls; each step picks the point whose ball
  ``{j : |x_i - x_j| < delta}`` holds the most points not yet covered (ties: lowest index); once
  everything is covered, the rest is a seeded random sample (as the authors do). ``delta`` by the
  paper's purity heuristic (:func:`purity_delta`) unless given.
- :func:`embed_pool`: the 512-d ResNet-18 features of the pool, from a warm-start state_dict
  (self-supervised on the pool) or, with none, a seeded untrained ResNet-18.

Features are L2-normalised first (``normalize=True``), as the authors do with their
self-supervised embeddings. Both pickers return pool indices in pick order, ``min(budget, N)``
of them, fewer when ``groups`` (int [N], < 0 = none) run out: with groups no two picks share one.
numpy + scikit-learn only; torch is imported by :func:`embed_pool` alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.neighbors import NearestNeighbors

TYPICALITY_EPS = 1e-5  # the authors' code: 1 / (mean distance + 1e-5)
MIN_CLUSTER_SIZE = 5  # smaller clusters are visited only once the larger ones run out
_KMEANS_MAX_CLUSTERS = 50  # above this, MiniBatchKMeans (as the authors' code)
_DIRECT_ROWS = 64  # typicality of at most this many rows: all pairwise differences at once


def _prepared(features: np.ndarray, normalize: bool) -> np.ndarray:
    """float64 [N, D], L2-normalised rows if ``normalize`` (zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"features must be a finite [N, D] array, got shape {x.shape}")
    if normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1.0)
    return x


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    return int(budget)


def typicality(features: np.ndarray, k: int) -> np.ndarray:
    """float64 [N]: ``1 / (mean Euclidean distance to the k nearest other rows + 1e-5)``;
    ``k`` is clipped to ``N - 1`` (a single row gets ``1 / 1e-5``)."""
    x = np.asarray(features, dtype=np.float64)
    k = min(k, len(x) - 1)
    if k <= 0:
        return np.full(len(x), 1.0 / TYPICALITY_EPS)
    if len(x) <= _DIRECT_ROWS:  # small sets (most clusters): every direct distance, no index
        dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2))
        np.fill_diagonal(dist, np.inf)
        return 1.0 / (np.sort(dist, axis=1)[:, :k].mean(axis=1) + TYPICALITY_EPS)
    # k + 1 neighbours hold the row itself unless duplicates crowd it out: keep k others
    nbr = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    other = nbr != np.arange(len(x))[:, None]
    keep = other & (np.cumsum(other, axis=1) <= k)
    rows, cols = np.nonzero(keep)
    # direct distances (symmetric, so mutual neighbours tie exactly and ties go to the lower
    # index), not the norm expansion that found the neighbours
    dist = np.sqrt(((x[rows] - x[nbr[rows, cols]]) ** 2).sum(axis=1)).reshape(len(x), k)
    return 1.0 / (dist.mean(axis=1) + TYPICALITY_EPS)


def kmeans_labels(features: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """int64 [N] cluster of each row: seeded KMeans, MiniBatchKMeans above 50 clusters."""
    n_clusters = min(n_clusters, len(features))
    model: Any
    if n_clusters <= _KMEANS_MAX_CLUSTERS:
        model = KMeans(n_clusters=n_clusters, n_init="auto", random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=n_clusters, n_init="auto", random_state=seed)
    return np.asarray(model.fit_predict(features), dtype=np.int64)


def _groups(groups: np.ndarray | None, n: int) -> np.ndarray | None:
    """``groups`` as int64 [n] (< 0 = none), or a ValueError."""
    if groups is None:
        return None
    arr = np.asarray(groups)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"groups must be an int array of shape ({n},), got {arr.shape}")
    return arr.astype(np.int64)


def _take(free: np.ndarray, groups: np.ndarray | None, i: int) -> None:
    """Row ``i`` is picked: it and (with groups) its group mates are no longer free."""
    free[i] = False
    if groups is not None and groups[i] >= 0:
        free[groups == groups[i]] = False


def typiclust_from_clusters(
    features: np.ndarray,
    clusters: np.ndarray,
    budget: int,
    *,
    k_neighbors: int = 20,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust's picks given the clustering ``clusters`` (int [N]): round-robin over the
    clusters by initial size, largest first (ties: lowest cluster id), clusters under
    ``MIN_CLUSTER_SIZE`` last; each visit takes the most typical free point of the cluster
    (typicality among its free points, ``k = min(k_neighbors, free // 2)``, ties: lowest index).
    """
    budget, x = _check_budget(budget), np.asarray(features, dtype=np.float64)
    clusters = np.asarray(clusters)
    grp, free = _groups(groups, len(x)), np.ones(len(x), dtype=bool)
    ids, sizes = np.unique(clusters, return_counts=True)
    by_size = ids[np.lexsort((ids, -sizes))]
    small = set(ids[sizes < MIN_CLUSTER_SIZE].tolist())
    rows_of = {c: np.flatnonzero(clusters == c) for c in ids.tolist()}
    picks: list[int] = []
    for tier in ([c for c in by_size if c not in small], [c for c in by_size if c in small]):
        in_tier = np.isin(clusters, tier)
        while len(picks) < budget and (free & in_tier).any():
            for c in tier:
                members = rows_of[c][free[rows_of[c]]]
                if len(members) == 0 or len(picks) == budget:
                    continue
                typ = typicality(x[members], min(k_neighbors, len(members) // 2))
                i = int(members[np.argmax(typ)])  # argmax: first maximum = lowest index
                picks.append(i)
                _take(free, grp, i)
    return np.asarray(picks, dtype=np.int64)


def typiclust(
    features: np.ndarray,
    budget: int,
    *,
    k_neighbors: int = 20,
    seed: int = 0,
    normalize: bool = True,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust cold start: int64 pool indices [min(budget, N)] in pick order (fewer when
    ``groups`` run out). features: float [N, D]; k-means into ``budget`` clusters (seeded),
    then :func:`typiclust_from_clusters`."""
    budget, x = _check_budget(budget), _prepared(features, normalize)
    if budget == 0 or len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    clusters = kmeans_labels(x, budget, seed)
    return typiclust_from_clusters(x, clusters, budget, k_neighbors=k_neighbors, groups=groups)


def purity_delta(
    features: np.ndarray, n_clusters: int, *, purity: float = 0.95, seed: int = 0
) -> float:
    """ProbCover's delta: the largest delta for which at least ``purity`` of the balls
    ``{j : |x_i - x_j| < delta}`` are pure (one k-means cluster, ``n_clusters`` = the number of
    classes in the paper). Ball i is pure iff ``delta <= r_i``, the distance from row i to the
    nearest row of another cluster, so this is an order statistic of ``r``. Features are used as
    given (normalise first, as :func:`probcover` does)."""
    x = np.asarray(features, dtype=np.float64)
    labels = kmeans_labels(x, n_clusters, seed)
    if not 0.0 < purity <= 1.0:
        raise ValueError(f"purity must be in (0, 1], got {purity}")
    r = np.full(len(x), np.inf)
    for c in np.unique(labels):
        inside, outside = labels == c, labels != c
        if outside.any():
            r[inside] = (
                NearestNeighbors(n_neighbors=1).fit(x[outside]).kneighbors(x[inside])[0][:, 0]
            )
    need = max(1, int(np.ceil(purity * len(x) - 1e-9)))  # balls that must be pure
    delta = float(np.sort(r)[len(x) - need])
    if not delta > 0:  # duplicates across clusters: the smallest positive gap
        pos = r[r > 0]
        delta = float(pos.min()) if len(pos) else np.inf
    if not np.isfinite(delta):  # one cluster: a ball that holds every row
        delta = 2.0 * float(np.linalg.norm(x, axis=1).max()) + 1.0
    return delta


def probcover(
    features: np.ndarray,
    budget: int,
    *,
    delta: float | None = None,
    n_clusters: int = 10,
    purity: float = 0.95,
    seed: int = 0,
    normalize: bool = True,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """ProbCover cold start: int64 pool indices [min(budget, N)] in pick order (fewer when
    ``groups`` run out). features: float [N, D]; ``delta``: the ball radius in the (normalised)
    feature space, or None for :func:`purity_delta` with ``n_clusters`` (the number of classes)
    and ``purity``. Greedy: pick the free point covering the most uncovered points (ties: lowest
    index), mark its ball covered; when nothing is left to cover, a seeded random sample of the
    free points fills the budget."""
    budget, x = _check_budget(budget), _prepared(features, normalize)
    if budget == 0 or len(x) == 0:
        return np.zeros(0, dtype=np.int64)
    if delta is None:
        delta = purity_delta(x, n_clusters, purity=purity, seed=seed)
    if not delta > 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    grp, free = _groups(groups, len(x)), np.ones(len(x), dtype=bool)
    balls = _balls(x, delta)  # CSR [N, N]: row i = the rows in ball i
    holders = balls.T.tocsr()  # row j = the balls that hold j
    degree = np.diff(balls.indptr).astype(np.int64)  # uncovered rows in each ball
    covered = np.zeros(len(x), dtype=bool)
    picks: list[int] = []
    while len(picks) < budget and free.any():
        score = np.where(free, degree, -1)
        i = int(np.argmax(score))  # first maximum: lowest index
        if score[i] <= 0:
            break
        picks.append(i)
        _take(free, grp, i)
        ball = balls.indices[balls.indptr[i] : balls.indptr[i + 1]]
        for j in ball[~covered[ball]]:
            covered[j] = True
            degree[holders.indices[holders.indptr[j] : holders.indptr[j + 1]]] -= 1
    for i in np.random.default_rng(seed).permutation(len(x)).tolist():
        if len(picks) == budget:
            break
        if free[i]:
            picks.append(i)
            _take(free, grp, i)
    return np.asarray(picks, dtype=np.int64)


def _balls(x: np.ndarray, delta: float) -> sparse.csr_matrix:
    """CSR bool [N, N]: entry (i, j) iff ``|x_i - x_j| < delta`` (self included)."""
    dist, nbr = NearestNeighbors(radius=delta).fit(x).radius_neighbors(x, sort_results=False)
    rows = [n[d < delta] for d, n in zip(dist, nbr, strict=True)]
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=bool)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(x), len(x)))


def embed_pool(
    images: np.ndarray,
    weights_path: str | Path | None = None,
    *,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
) -> np.ndarray:
    """float32 [N, 512]: ResNet-18 global-average-pooled features of uint8 images [N, H, W, 3]
    (no augmentation), from the ResNet-18 state_dict at ``weights_path`` (the warm start), or a
    randomly initialised one seeded by ``seed`` when None."""
    import torch

    from ml.data import ImageDataset
    from ml.infer import score_pool
    from ml.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("classification", 2, weights_path)
    out = score_pool(model, ImageDataset(images), batch_size=batch_size, device=device)
    return out.features
