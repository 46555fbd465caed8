"""Cold start (ml.coldstart): TypiClust and ProbCover on toy embeddings against plain-Python
brute-force references (tiny N, every distance computed in a loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ml.coldstart import (
    MIN_CLUSTER_SIZE,
    TYPICALITY_EPS,
    embed_pool,
    kmeans_labels,
    probcover,
    purity_delta,
    typicality,
    typiclust,
    typiclust_from_clusters,
)


def _d(a: np.ndarray, b: np.ndarray) -> float:
    return math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b, strict=True)))


def _dmat(x: np.ndarray) -> list[list[float]]:
    return [[_d(a, b) for b in x] for a in x]


def _ref_typicality(dm: list[list[float]], rows: list[int], k: int) -> list[float]:
    """Typicality of ``rows`` among themselves, from the literal distance table ``dm``."""
    k = min(k, len(rows) - 1)
    if k <= 0:
        return [1.0 / TYPICALITY_EPS] * len(rows)
    out = []
    for i in rows:
        near = sorted(dm[i][j] for j in rows if j != i)[:k]
        out.append(1.0 / (sum(near) / k + TYPICALITY_EPS))
    return out


def _ref_typiclust(
    x: np.ndarray, clusters: np.ndarray, budget: int, k: int, groups: np.ndarray | None = None
) -> list[int]:
    """Round-robin by initial cluster size (largest first, ties lowest id), small clusters only
    once the large ones are empty, most typical free member (typicality among free members)."""
    dm = _dmat(x)
    ids = sorted(set(clusters.tolist()))
    size = {c: int((clusters == c).sum()) for c in ids}
    by_size = sorted(ids, key=lambda c: (-size[c], c))
    free = [True] * len(x)
    picks: list[int] = []
    for tier in (
        [c for c in by_size if size[c] >= MIN_CLUSTER_SIZE],
        [c for c in by_size if size[c] < MIN_CLUSTER_SIZE],
    ):
        while len(picks) < budget and any(free[i] and clusters[i] in tier for i in range(len(x))):
            for c in tier:
                members = [i for i in range(len(x)) if clusters[i] == c and free[i]]
                if not members or len(picks) == budget:
                    continue
                typ = _ref_typicality(dm, members, min(k, len(members) // 2))
                best = members[max(range(len(members)), key=lambda m: (typ[m], -members[m]))]
                picks.append(best)
                for j in range(len(x)):
                    if j == best or (
                        groups is not None and groups[best] >= 0 and groups[j] == groups[best]
                    ):
                        free[j] = False
    return picks


def _ref_probcover(
    x: np.ndarray, budget: int, delta: float, groups: np.ndarray | None = None
) -> list[int]:
    """Greedy max coverage with literal ball counts; stops where no free ball covers anything."""
    n, dm = len(x), _dmat(x)
    ball = [[j for j in range(n) if dm[i][j] < delta] for i in range(n)]
    covered: set[int] = set()
    free = [True] * n
    picks: list[int] = []
    while len(picks) < budget and any(free):
        gain = [len(set(ball[i]) - covered) if free[i] else -1 for i in range(n)]
        i = max(range(n), key=lambda i: (gain[i], -i))
        if gain[i] <= 0:
            break
        picks.append(i)
        covered |= set(ball[i])
        for j in range(n):
            if j == i or (groups is not None and groups[i] >= 0 and groups[j] == groups[i]):
                free[j] = False
    return picks


def _toy(seed: int, n: int = 40, d: int = 5) -> np.ndarray:
    """Clumpy toy embedding with exact duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, d)) * 3
    x = centres[rng.integers(0, 4, n)] + rng.standard_normal((n, d))
    x[rng.integers(0, n, 4)] = x[rng.integers(0, n, 4)]
    return x


def _groups(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(500 + seed)
    g = rng.integers(0, n // 2, n)
    g[rng.random(n) < 0.2] = -1
    return g


def test_typicality_matches_brute_force() -> None:
    for seed in range(5):
        x = _toy(seed, n=25)
        for k in (1, 3, 20, 30):
            want = _ref_typicality(_dmat(x), list(range(len(x))), k)
            np.testing.assert_allclose(typicality(x, k), want, rtol=1e-9)
    x = _toy(9, n=90)  # above the all-pairs size: a neighbour index, then direct distances
    x[:8] = x[8]  # a clump of 9 duplicates: the index may return duplicates before the row itself
    for k in (1, 6, 12):
        want = _ref_typicality(_dmat(x), list(range(len(x))), k)
        np.testing.assert_allclose(typicality(x, k), want, rtol=1e-9)
    assert typicality(np.zeros((1, 3)), 5).tolist() == [1.0 / TYPICALITY_EPS]


@pytest.mark.parametrize("with_groups", [False, True])
def test_typiclust_from_clusters_matches_brute_force(with_groups: bool) -> None:
    for seed in range(5):
        x = _toy(seed, n=40)
        rng = np.random.default_rng(seed)
        clusters = rng.integers(0, 9, len(x))  # arbitrary clusters, some under 5 points
        groups = _groups(seed, len(x)) if with_groups else None
        for budget in (3, 9, 45):
            got = typiclust_from_clusters(x, clusters, budget, k_neighbors=4, groups=groups)
            want = _ref_typiclust(x, clusters, budget, 4, groups)
            assert got.tolist() == want, (seed, budget)


def test_typiclust_picks_the_densest_point_of_each_blob() -> None:
    """Four separated blobs of 40, 30, 20 and 10 points, budget 4: k-means finds the blobs, and
    the picks are the reference's on the true blob labels (largest blob first)."""
    rng = np.random.default_rng(3)
    sizes, centres = [40, 30, 20, 10], np.eye(4) * 50
    blob = np.repeat(np.arange(4), sizes)
    x = centres[blob] + rng.standard_normal((100, 4))
    got = typiclust(x, 4, k_neighbors=5, seed=0, normalize=False)
    assert got.tolist() == _ref_typiclust(x, blob, 4, 5)
    assert [int(blob[i]) for i in got] == [0, 1, 2, 3]
    # normalising already unit rows changes nothing
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(
        typiclust(unit, 4, seed=1), typiclust(unit, 4, seed=1, normalize=False)
    )
    assert typiclust(x, 0).tolist() == [] and len(typiclust(x[:3], 10)) == 3


@pytest.mark.parametrize("with_groups", [False, True])
def test_probcover_matches_brute_force(with_groups: bool) -> None:
    for seed in range(8):
        x = _toy(seed)
        groups = _groups(seed, len(x)) if with_groups else None
        for delta in (0.5, 1.5, 3.0):
            for budget in (1, 5, 15):
                got = probcover(x, budget, delta=delta, normalize=False, groups=groups, seed=seed)
                want = _ref_probcover(x, budget, delta, groups)
                assert got[: len(want)].tolist() == want, (seed, delta, budget)
                # the rest: distinct free rows, up to the budget (or the groups)
                assert len(set(got.tolist())) == len(got)
                if groups is None:
                    assert len(got) == min(budget, len(x))
                else:
                    picked = [int(groups[i]) for i in got if groups[i] >= 0]
                    assert len(picked) == len(set(picked))


def test_purity_delta_is_the_largest_delta_with_enough_pure_balls() -> None:
    for seed in range(3):
        x = _toy(seed, n=24)
        labels, dm, n = kmeans_labels(x, 3, seed=seed).tolist(), _dmat(x), len(x)
        # a ball's purity only changes at a pairwise distance: try them all, largest first
        distances = sorted({dm[i][j] for i in range(n) for j in range(i + 1, n)}, reverse=True)
        purity = {
            d: sum(len({labels[j] for j in range(n) if dm[i][j] < d}) == 1 for i in range(n)) / n
            for d in distances
        }
        for p in (0.5, 0.8, 0.95):
            want = next(d for d in distances if purity[d] >= p)
            got = purity_delta(x, 3, purity=p, seed=seed)
            assert got == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="purity"):
        purity_delta(x, 3, purity=0.0)


def test_probcover_default_delta_and_errors() -> None:
    x = _toy(0)
    got = probcover(x, 6, n_clusters=4, seed=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = _ref_probcover(unit, 6, purity_delta(unit, 4, seed=0))
    assert got[: len(want)].tolist() == want and len(got) == 6
    with pytest.raises(ValueError, match="delta"):
        probcover(x, 3, delta=0.0)
    with pytest.raises(ValueError, match="budget"):
        typiclust(x, -1)
    with pytest.raises(ValueError, match="groups"):
        probcover(x, 3, delta=1.0, groups=np.zeros(3, dtype=int))


def test_embed_pool_is_seeded_and_loads_a_warm_start(tmp_path: object) -> None:
    import torch

    from ml.data import ImageDataset
    from ml.infer import score_pool
    from ml.models import build_model

    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    a, b = embed_pool(images, seed=1, device="cpu"), embed_pool(images, seed=1, device="cpu")
    assert a.shape == (6, 512) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    torch.manual_seed(7)
    warm = build_model("classification", 7)
    path = f"{tmp_path}/backbone.pt"
    torch.save(warm.resnet.state_dict(), path)
    want = score_pool(warm, ImageDataset(images), device="cpu").features
    np.testing.assert_allclose(embed_pool(images, path, device="cpu"), want, rtol=1e-5, atol=1e-6)
