"""Confident k-center greedy selection (paper Algorithm 1; eq. 5 and its ablations), exact and fast.

At each of B greedy steps the pick is the candidate (unlabeled, not yet picked) maximising

* ``product`` (eq. 5): ``N(m)^alpha * N(g)^(1-alpha)``,
* ``sum`` (eq. 6): ``N(m) + N(g)``,
* ``rank``: ``-(rank_m + rank_g) / 2`` (late fusion of the two rankings),

where ``m`` is the min Euclidean distance to the labeled + already-picked set, ``g`` the predicted
loss and ``N`` min-max normalisation over the current candidates.

Conventions (the brute-force references in the tests implement the same):

* ``N(v) = 1`` for every candidate when ``v`` is constant over the candidates (the term then
  carries no information and the other term decides).
* ``rank_v(i)`` = number of candidates with ``v`` strictly greater than ``v_i`` (0 = best; tied
  values share the better rank).
* Ties of the maximised score go to the lowest pool index.
* Empty labeled set: the first pick is the argmax of ``g`` (``alpha == 1`` or no ``g``: the lowest
  candidate index); its ``min_distance`` is ``inf`` and its ``combined`` is ``nan``.
* ``alpha == 0`` (pure loss ranking) needs no distances and lives in :mod:`ml.selection`.

Exactness: every ``m`` value is a float64 *direct* distance ``sqrt(sum((x_i - x_j)**2))`` between
the original feature rows. Cheap screens (norm expansion in the screen dtype) only decide which
rows need that direct evaluation, with rigorous rounding-error margins, so they never change a
value. For ``0 < alpha < 1`` the argmax of eq. 5 equals the argmax of
``alpha*log(m - min m) + (1-alpha)*log(g - min g)`` (the log is monotone and the maxima only
shift it by constants), which needs no powers and cannot underflow.

Speed (per METHOD.md): the running min-distance vector is O(N); it is initialised with blocked
matrix products (tiles of ``_CB x _LB``, never N x L) and updated per pick by a matrix-vector
product. On CUDA the update is one dense direct distance pass with no host sync (picks stay on
the device until the end). On CPU (numpy):

* the initialisation skips far blocks (``_Greedy._init_pruned``): labeled rows are grouped by
  k-means in PCA space, and a group whose PCA-space ball lies farther from every row of a
  candidate tile than those rows' screened min over their nearest group is never multiplied;
* eq. 5 runs lazily (``_Lazy``, product mode without groups): m only decreases and eq. 5 is
  increasing in m for fixed (min m, min g), so stale m values bound the scores from above; a
  small working set is kept exact pick by pick, the rest is brought up to date in one batched,
  group-pruned pass per block of picks, and a block whose picks moved min m (the normalisation
  offset) outside the working set is cut back to the last pick that saw the true min m. The
  other modes (eq. 6, rank, groups) use the per-pick update, screened in two stages (a PCA lower
  bound on ``_K + 1`` dims, then the full dims in float32 on the survivors only).

Both speed-ups change no value: the tests compare them bit for bit with the per-pick path.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Array = Any  # a numpy.ndarray or a torch.Tensor, depending on the backend
Mode = Literal["product", "sum", "rank"]
Pair = tuple[Array, Array]

_CB = 2048  # candidate rows per tile of the blocked initialisation
_LB = 4096  # labeled rows per tile
_CHUNK = 4096  # rows per chunk of direct float64 distances
_K = 32  # PCA dims of the stage-1 lower bound
_PCA_ROWS = 8192  # rows used to estimate the PCA basis (affects speed only, never picks)
_REL = 1e-9  # relative slack covering float64 rounding of the direct distances
_BIG = np.iinfo(np.int64).max
_GROUP = 32  # labeled rows per k-means group of the pruned initialisation
_KMEANS_STEPS = 8
_KS = 512  # rows of the lazy working set chosen by score (see _Greedy._block)
_KM = 128  # rows of the lazy working set chosen by min distance
_BLOCK = 256  # most picks per lazy block
_LAZY_MIN = 1  # fewest candidates for the lazy greedy
_LAZY_GROUP = 256  # candidates per PCA group of the lazy layout when the init did not prune
_PB = 256  # candidate rows per tile of the pruned initialisation
_PRUNE_MIN = 2**32  # candidates x labeled x dims above which the initialisation prunes


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[R, C] squared distances by norm expansion (float64; used for bounds with a slack)."""
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]


def _kmeans(z: np.ndarray, k: int) -> np.ndarray:
    """[k', D] centres: farthest-point start, ``_KMEANS_STEPS`` Lloyd steps (deterministic)."""
    cen = _farthest_points(z, k)
    for _ in range(_KMEANS_STEPS):
        a = _nearest(z, cen)
        cnt = np.bincount(a, minlength=len(cen))
        sums = np.zeros_like(cen)
        np.add.at(sums, a, z)
        cen = np.where(cnt[:, None] > 0, sums / np.maximum(cnt, 1)[:, None], cen)
    return cen


def _balls(
    z: np.ndarray, cen: np.ndarray, a: np.ndarray | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Rows of ``z`` by nearest centre: (members of each non-empty group, their mean [G, D],
    their radius around it [G])."""
    a = _nearest(z, cen) if a is None else a
    members = [r for r in (np.flatnonzero(a == b) for b in range(len(cen))) if len(r)]
    mean = np.stack([z[r].mean(0) for r in members])
    rad = np.array(
        [np.sqrt(((z[r] - c) ** 2).sum(1)).max() for r, c in zip(members, mean, strict=True)]
    )
    return members, mean, rad


def _top_mask(v: np.ndarray, k: int) -> np.ndarray:
    """[n] bool: the ``k`` largest entries of ``v`` and every entry tied with the k-th."""
    if k >= len(v):
        return np.ones(len(v), dtype=bool)
    return v >= np.partition(v, len(v) - k)[len(v) - k]


def _farthest_points(z: np.ndarray, k: int) -> np.ndarray:
    """[k', D] rows of ``z`` picked by greedy farthest-point traversal from row 0 (k' <= k:
    stops early at duplicates); the k-means start of the pruned initialisation."""
    idx, d = [0], ((z - z[0]) ** 2).sum(1)
    while len(idx) < k and d.max() > 0:
        idx.append(int(np.argmax(d)))
        d = np.minimum(d, ((z - z[idx[-1]]) ** 2).sum(1))
    return z[idx]


def _nearest(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[R] index of the nearest row of ``c`` for each row of ``a``, in chunks."""
    return np.concatenate(
        [np.argmin(_sqdist(a[s : s + _CHUNK], c), 1) for s in range(0, len(a), _CHUNK)]
    )


@dataclass(frozen=True)
class KCenterResult:
    """Picks of the greedy, in pick order: ``indices`` int64 [B'], ``min_distance`` float64 [B']
    (distance to the labeled + already-picked set when picked), ``combined`` float64 [B'] (the
    score maximised at that pick, in the paper's form: eq. 5 / eq. 6 value or minus mean rank)."""

    indices: np.ndarray
    min_distance: np.ndarray
    combined: np.ndarray


class _NumpyOps:
    """Array operations on numpy (CPU). `_TorchOps` provides the same names on a torch device."""

    sync_free = False  # True: avoid data-dependent host syncs inside the greedy loop

    def __init__(self) -> None:
        self.xp: Any = np
        self.f64: Any = np.float64
        self.screen: Any = np.float32  # dtype of the norm-expansion screens
        self.i64: Any = np.int64
        self.screen_u = float(np.finfo(np.float32).eps) / 2  # unit roundoff of the screens

    def features(self, a: np.ndarray) -> Array:
        """The pool features as the direct distances read them (numpy: no copy)."""
        return a

    def put(self, a: np.ndarray, dtype: Any) -> Array:
        return np.ascontiguousarray(a, dtype=dtype)

    def host(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def full(self, n: int | tuple[int, ...], value: float, dtype: Any) -> Array:
        return np.full(n, value, dtype=dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return np.empty(shape, dtype=dtype)

    def cast(self, a: Array, dtype: Any) -> Array:
        return a.astype(dtype, copy=False)

    def nonzero(self, mask: Array) -> Array:
        return np.flatnonzero(mask)

    def nonzero2(self, mask: Array) -> tuple[Array, Array]:
        return np.nonzero(mask)  # type: ignore[return-value]

    def arange(self, n: int) -> Array:
        return np.arange(n)

    def row(self, a: Array, i: Array) -> Array:
        return a[i].copy() if a.ndim > 1 else a[i]

    def store(self, buf: Array, t: int, values: list[Array]) -> None:
        buf[t] = [float(v) for v in values]

    def move(self, a: Array, pos: Array, src: int) -> None:
        a[pos] = a[src]

    def scatter_min(self, target: Array, idx: Array, values: Array) -> None:
        np.minimum.at(target, idx, values)

    def eigh_vectors(self, c: Array) -> Array:
        return np.linalg.eigh(c)[1]

    def rank_desc(self, v: Array) -> Array:
        s = np.sort(v)
        return (len(v) - np.searchsorted(s, v, side="right")).astype(np.float64)

    def dense_direct(self, xo: Array, u: Array) -> Array | None:
        return None  # no dense path on numpy: the screened update is faster on CPU


class _TorchOps(_NumpyOps):
    """The same operations on a torch device; screens run in float64 (no TF32 surprises)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.sync_free = self.device.type != "cpu"
        self.xp = torch
        self.f64, self.screen, self.i64 = torch.float64, torch.float64, torch.int64
        self.screen_u = float(torch.finfo(torch.float64).eps) / 2

    def features(self, a: np.ndarray) -> Array:
        return self.put(a, self.f64)

    def put(self, a: np.ndarray, dtype: Any) -> Array:
        return self.torch.as_tensor(np.asarray(a), device=self.device).to(dtype).contiguous()

    def host(self, a: Array) -> np.ndarray:
        return np.asarray(a.cpu().numpy())

    def full(self, n: int | tuple[int, ...], value: float, dtype: Any) -> Array:
        return self.torch.full(
            n if isinstance(n, tuple) else (n,), value, dtype=dtype, device=self.device
        )

    def cast(self, a: Array, dtype: Any) -> Array:
        return a.to(dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return self.torch.empty(shape, dtype=dtype, device=self.device)

    def nonzero(self, mask: Array) -> Array:
        return self.torch.nonzero(mask).flatten()

    def nonzero2(self, mask: Array) -> tuple[Array, Array]:
        i, j = self.torch.nonzero(mask, as_tuple=True)
        return i, j

    def arange(self, n: int) -> Array:
        return self.torch.arange(n, device=self.device)

    def row(self, a: Array, i: Array) -> Array:
        return a.index_select(0, i.reshape(1))[0]

    def move(self, a: Array, pos: Array, src: int) -> None:
        a.index_copy_(0, pos.reshape(1), a[src : src + 1].clone())

    def store(self, buf: Array, t: int, values: list[Array]) -> None:
        buf[t].copy_(self.torch.stack([v.to(buf.dtype) for v in values]))

    def scatter_min(self, target: Array, idx: Array, values: Array) -> None:
        target.scatter_reduce_(0, idx, values, reduce="amin")

    def eigh_vectors(self, c: Array) -> Array:
        return self.torch.linalg.eigh(c).eigenvectors

    def rank_desc(self, v: Array) -> Array:
        s = self.torch.sort(v).values
        return (len(v) - self.torch.searchsorted(s, v, right=True)).to(self.torch.float64)

    def dense_direct(self, xo: Array, u: Array) -> Array | None:
        d = self.torch.cdist(xo, u.reshape(1, -1), compute_mode="donot_use_mm_for_euclid_dist")
        return d[:, 0]


def make_ops(device: str = "cpu", backend: str = "auto") -> _NumpyOps:
    """Backend for `device`: numpy for ``cpu`` (the faster CPU path) unless ``backend='torch'``;
    any other device (``cuda``, ``cuda:1``...) uses torch."""
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch', got {backend!r}")
    if device == "cpu" and backend != "torch":
        return _NumpyOps()
    if backend == "numpy":
        raise ValueError(f"the numpy backend only runs on device 'cpu', got {device!r}")
    try:
        return _TorchOps(device)
    except RuntimeError as err:  # torch.device() rejects the string
        raise ValueError(f"unknown device {device!r}: {err}") from err


def _one_blas_thread(active: bool) -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread for the greedy loop (if threadpoolctl is installed). Its
    per-pick products are small and memory-bound; on a busy 2-core machine threaded OpenBLAS
    gemv stalled them ~15x (measured), while one thread loses little when the machine is idle."""
    if active:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            return threadpool_limits(limits=1, user_api="blas")
    return contextlib.nullcontext()


class _Greedy:
    """One greedy run. Arrays over the candidates are compacted: a pick is swap-removed (the last
    active slot moves into its place), so ``[:n]`` is always the current candidate set and ties
    are resolved through ``orig`` (the pool index of each slot).

    Groups: ``eligible`` [N] bool limits the candidates (an unlabeled row outside it is neither a
    candidate nor a centre); with ``groups`` [N] int64 (< 0 = no group) a pick also swap-removes
    every other candidate of its group, so the run may end with fewer than ``budget`` picks."""

    def __init__(
        self,
        ops: _NumpyOps,
        features: np.ndarray,
        labeled: np.ndarray,
        g: np.ndarray | None,
        alpha: float,
        mode: Mode,
        update: str,
        eligible: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        cand_mask = ~labeled if eligible is None else ~labeled & eligible
        cand, lab = np.flatnonzero(cand_mask), np.flatnonzero(labeled)
        self.grp = None if groups is None else ops.put(groups[cand], ops.i64)  # [U] group ids
        self.ops, self.alpha, self.mode, self.n_lab = ops, alpha, mode, len(lab)
        self.xo = ops.features(features)  # [N, D] original rows, read by the direct distances
        self.orig, self.lab = ops.put(cand, ops.i64), ops.put(lab, ops.i64)
        self.g = ops.put(np.zeros(len(cand)) if g is None else g[cand], ops.f64)
        self.seed_by_g = g is not None and not (mode == "product" and alpha == 1.0)
        dim = features.shape[1]
        self.eps = 4.0 * (dim + 8) * ops.screen_u  # squared-distance error / (|a|^2 + |b|^2)
        self.mu = self._mean()
        self.xs, self.nx = self._screen_rows(self.orig)  # [U, D] centred screen copy, [U] norms^2
        self.zc: np.ndarray | None = None  # PCA coords and group centres of the pruned init
        self.zcen: np.ndarray | None = None
        self.zgroup: np.ndarray | None = None
        self.m = self._init_min_distance()  # [U] float64, exact direct distances
        self.dense = update == "dense" or (update == "auto" and ops.sync_free)
        self.z: Array | None = None  # [K+1, U] stage-1 columns, see _project
        self.nz: Array | None = None
        self.big = len(cand) * dim > 2**20 and not ops.sync_free  # limit BLAS threads, see below
        lazy = self.lazy_ok() and self.n_lab > 0  # the lazy greedy needs no stage-1 columns
        if not self.dense and not lazy and dim > 2 * _K and len(cand) > 4 * _K:
            with _one_blas_thread(self.big):
                self.z, self.nz = self._project()
        # screen right-hand sides (see _screen), refreshed wherever m changes
        self.b1 = None if self.nz is None else self._rhs1(self.m, self.nz, self.nx)
        self.b2 = self._rhs2(self.m, self.nx)
        self.tg: Array | None = None  # cached g term of eq. 5 and its (min g, max g) key
        self.tg_key: tuple[float, float] | None = None

    def _rhs1(self, m: Array, nz: Array, nx: Array) -> Array:
        return m * m * (1 + _REL) - nz + self.eps * nx

    def _rhs2(self, m: Array, nx: Array) -> Array:
        return m * m * (1 + _REL) - (1 - self.eps) * nx

    def _mean(self) -> Array:
        """[D] float64 mean of all pool rows (centring keeps the screens' norms small)."""
        ops, n = self.ops, self.xo.shape[0]
        acc = ops.full(self.xo.shape[1], 0.0, ops.f64)
        for s in range(0, n, _CHUNK):
            acc = acc + ops.cast(self.xo[s : s + _CHUNK], ops.f64).sum(0)
        return acc / n

    def _screen_rows(self, rows: Array) -> Pair:
        """Centred rows in the screen dtype [R, D] and their float64 squared norms [R]."""
        ops, r = self.ops, len(rows)
        xs, nx = ops.empty((r, self.xo.shape[1]), ops.screen), ops.full(r, 0.0, ops.f64)
        for s in range(0, r, _CHUNK):
            x = ops.cast(self.xo[rows[s : s + _CHUNK]], ops.f64) - self.mu
            xs[s : s + _CHUNK] = ops.cast(x, ops.screen)
            nx[s : s + _CHUNK] = (ops.cast(xs[s : s + _CHUNK], ops.f64) ** 2).sum(1)
        return xs, nx

    def _direct(self, rows: Array, other: Array | None = None, u: Array | None = None) -> Array:
        """Float64 direct distances [R]: row ``rows[k]`` to ``other[k]`` (pool indices) or to the
        float64 vector ``u`` [D]; chunked, so at most ``_CHUNK x D`` temporaries."""
        ops, out = self.ops, []
        for s in range(0, len(rows), _CHUNK):
            a = ops.cast(self.xo[rows[s : s + _CHUNK]], ops.f64)
            b = u if other is None else ops.cast(self.xo[other[s : s + _CHUNK]], ops.f64)
            out.append(ops.xp.sqrt(((a - b) ** 2).sum(1)))
        return ops.xp.concatenate(out) if out else ops.full(0, 0.0, ops.f64)

    def _init_min_distance(self) -> Array:
        """[U] min direct distance of each candidate to the labeled set (``inf`` if none).
        Blocked screen: tiles ``[x, 1] @ [-2 l, |l|^2].T`` give ``d^2 - |x|^2`` in the screen
        dtype; every labeled row within twice the rounding bound of a row's screened minimum is
        re-evaluated directly, so the result is the exact float64 minimum."""
        ops, n_c = self.ops, len(self.orig)
        m = ops.full(n_c, math.inf, ops.f64)
        if self.n_lab == 0 or n_c == 0:
            return m
        lt, nl = self._screen_rows(self.lab)
        laug = ops.xp.concatenate([-2 * lt, ops.cast(nl, ops.screen)[:, None]], axis=1)  # [L, D+1]
        ones, nlmax = ops.full((_CB, 1), 1.0, ops.screen), float(nl.max())
        if self._prune_init(n_c):
            with _one_blas_thread(True):  # many mid-sized products: see _one_blas_thread
                self._init_pruned(m, laug, nlmax)
            return m
        for s in range(0, n_c, _CB):
            e = min(s + _CB, n_c)
            xaug = ops.xp.concatenate([self.xs[s:e], ones[: e - s]], axis=1)  # [cb, D+1]
            i, j = self._near_pairs(xaug, self.nx[s:e], laug, nlmax)
            ops.scatter_min(m[s:e], i, self._direct(self.orig[s:e][i], other=self.lab[j]))
        return m

    def _prune_init(self, n_c: int) -> bool:
        """Whether to skip far (candidate tile, labeled group) blocks of the initialisation: CPU
        (numpy) only, and only where the N x L product is large."""
        dim = self.xo.shape[1]
        return (
            isinstance(self.xo, np.ndarray)
            and not self.ops.sync_free
            and dim > 2 * _K
            and self.n_lab >= 4 * _GROUP
            and n_c * self.n_lab * dim > _PRUNE_MIN
        )

    def _basis(self, rows: Array) -> Array:
        """[D, K] float64 top PCA directions of a sample of the centred screen rows ``rows``."""
        ops, n = self.ops, rows.shape[0]
        sample = ops.cast(rows[:: max(1, n // _PCA_ROWS)][:_PCA_ROWS], ops.f64)
        return ops.eigh_vectors(sample.T @ sample)[:, -_K:]

    def _pz(self, rows: np.ndarray, p: np.ndarray) -> np.ndarray:
        """[R, K] float64 PCA coordinates ``(x - mu) @ P`` of pool rows ``rows`` (from the original
        rows in float64, so the projected distances are lower bounds up to ~1e-15 relative)."""
        out = np.empty((len(rows), p.shape[1]))
        for s in range(0, len(rows), _CHUNK):
            out[s : s + _CHUNK] = (self.xo[rows[s : s + _CHUNK]].astype(np.float64) - self.mu) @ p
        return out

    def _init_pruned(self, m: np.ndarray, laug: np.ndarray, nlmax: float) -> None:
        """The blocked initialisation with far blocks skipped (same result as the dense one).

        The labeled rows are split into ``~L / _GROUP`` groups by a few k-means steps in PCA
        space, the candidates sorted by their nearest group centre and cut into tiles. A labeled
        group B lies at least ``min_i (|z_i - c_B| - r_B)`` from a tile's rows (z: PCA coords,
        c_B, r_B: the group's centre and radius there; projection cannot increase distances).
        Each tile first screens its nearest group, which bounds every row's min distance from
        above (screened value + margin); groups farther than that bound from every row of the
        tile cannot hold a row's nearest labeled point and are skipped. The others go through
        the same screen + direct recheck as the dense path, so the minima are exact."""
        n_c = len(self.orig)
        p = self._basis(self.xs)
        zl, zc = self._pz(self.lab, p), self._pz(self.orig, p)
        members, cen, rad = _balls(zl, _kmeans(zl, max(2, self.n_lab // _GROUP)))
        self.zc, self.zcen, self.zgroup = zc, cen, _nearest(zc, cen)  # reused by _Lazy
        order = np.argsort(self.zgroup, kind="stable")
        slack = 1e-9 * (np.abs(zc).max() + np.abs(zl).max() + 1.0)  # rounding of z and P
        ones = np.ones((_PB, 1), dtype=laug.dtype)
        for s in range(0, n_c, _PB):
            rows = order[s : s + _PB]
            zr = zc[rows]
            err = 1e-12 * ((zr * zr).sum(1)[:, None] + (cen * cen).sum(1)[None, :])
            dz = np.sqrt(np.maximum(_sqdist(zr, cen) - err, 0.0))  # <= |z_i - c_B|
            lb = dz - rad[None, :] * (1 + 1e-12) - slack  # [r, groups] lower bounds
            xaug = np.concatenate([self.xs[rows], ones[: len(rows)]], axis=1)
            first = np.concatenate([members[b] for b in np.unique(np.argmin(lb, 1))])
            nxb = self.nx[rows]
            *_, best = self._near_pairs(xaug, nxb, laug[first], nlmax, with_best=True)
            ub = np.sqrt(np.maximum(best + 2 * self.eps * (nxb + nlmax), 0.0)) * (1 + 1e-9)
            near = np.flatnonzero((lb <= ub[:, None]).any(0))
            lab_rows = np.concatenate([members[b] for b in near])
            i, j = self._near_pairs(xaug, nxb, laug[lab_rows], nlmax)[:2]
            d = self._direct(self.orig[rows[i]], other=self.lab[lab_rows[j]])
            np.minimum.at(m, rows[i], d)

    def _near_pairs(
        self, xaug: Array, nxb: Array, laug: Array, nlmax: float, with_best: bool = False
    ) -> tuple[Array, ...]:
        """(row, labeled) index pairs whose screened squared distance is within ``2 * margin``
        of the row's screened minimum over all labeled tiles (a superset of the true argmins).
        Per tile: the row argmin, and (rarely) every entry of rows whose second-smallest entry
        is also within the margin."""
        ops, xp = self.ops, self.ops.xp
        marg, rows = 2 * self.eps * (nxb + nlmax), ops.arange(len(nxb))
        best = ops.full(len(nxb), math.inf, ops.f64)
        found: list[tuple[Array, Array, Array]] = []
        for j0 in range(0, laug.shape[0], _LB):
            t = xaug @ laug[j0 : j0 + _LB].T  # [cb, lb] screen dtype: d^2 - |x|^2
            am = xp.argmin(t, 1)
            v1 = ops.cast(t[rows, am], ops.f64) + nxb
            best = xp.minimum(best, v1)
            t[rows, am] = math.inf
            amb = ops.nonzero(ops.cast(xp.amin(t, 1), ops.f64) + nxb <= best + marg)
            ta = ops.cast(t[amb], ops.f64) + nxb[amb][:, None]
            i2, j2 = ops.nonzero2(ta <= (best + marg)[amb][:, None])
            found += [(rows, am + j0, v1), (amb[i2], j2 + j0, ta[i2, j2])]
        i, j, v = (ops.xp.concatenate([f[k] for f in found]) for k in range(3))
        keep = v <= best[i] + marg[i]
        return (i[keep], j[keep], best) if with_best else (i[keep], j[keep])

    def _project(self) -> Pair:
        """Stage-1 screen data: ``[P^T x, |x - P P^T x|]`` [U, K+1] (screen dtype) and its float64
        squared norms [U]; P [D, K] = top PCA directions of a row sample. For orthonormal P the
        distance between two such rows is a lower bound of the full distance."""
        ops, xp, n_c = self.ops, self.ops.xp, len(self.orig)
        p = self._basis(self.xs)
        z, nz = ops.full((_K + 1, n_c), 0.0, ops.screen), ops.full(n_c, 0.0, ops.f64)
        for s in range(0, n_c, _CHUNK):
            x = ops.cast(self.xs[s : s + _CHUNK], ops.f64)
            zp = x @ p
            res = xp.sqrt(((x - zp @ p.T) ** 2).sum(1))
            zs = ops.cast(ops.xp.concatenate([zp, res[:, None]], axis=1), ops.screen)
            z[:, s : s + _CHUNK] = zs.T  # column layout: the per-pick product streams rows
            nz[s : s + _CHUNK] = (ops.cast(zs, ops.f64) ** 2).sum(1)
        return z, nz

    def _g_term(self, g: Array, gmin: Array, gmax: Array) -> Array:
        """``(1 - alpha) * log(g - min g)`` (0 for constant g); cached on CPU between changes
        of (min g, max g), recomputed every step on a GPU (no host sync)."""
        xp = self.ops.xp
        key = None if self.ops.sync_free else (float(gmin), float(gmax))
        if key is None or key != self.tg_key:
            self.tg = xp.where(gmax > gmin, (1 - self.alpha) * xp.log(g - gmin), 0.0)
            self.tg_key = key
        return self.tg

    def _score(self, n: int, seed: bool) -> tuple[Array, list[Array]]:
        """Score [n] maximised at this step, and [min m, max m, min g, max g] over candidates."""
        ops, xp, a = self.ops, self.ops.xp, self.alpha
        m, g = self.m[:n], self.g[:n]
        stats = [m.min(), m.max(), g.min(), g.max()]
        mmin, mmax, gmin, gmax = stats
        if seed:  # empty labeled set: argmax g, or the lowest index (all scores tie)
            return (g if self.seed_by_g else ops.full(n, 0.0, ops.f64)), stats
        if self.mode == "rank":
            return -(ops.rank_desc(m) + ops.rank_desc(g)) / 2, stats
        if self.mode == "sum":  # eq. 6
            nm = xp.where(mmax > mmin, (m - mmin) / (mmax - mmin), 1.0)
            return nm + xp.where(gmax > gmin, (g - gmin) / (gmax - gmin), 1.0), stats
        if a == 1.0:  # plain k-center: argmax N(m) == argmax m
            return m, stats
        tm = xp.where(mmax > mmin, a * xp.log(m - mmin), 0.0)  # eq. 5 in log form
        return tm + self._g_term(g, gmin, gmax)[:n], stats

    def _screen(self, x_u: Array, nx_u: Array, z_u: Array | None, nz_u: Array, n: int) -> Array:
        """Slots [k] whose distance to the new centre may be below their current ``m``. The others
        provably keep ``m``: their screened squared distance minus the rounding margin
        ``eps * (|x|^2 + |u|^2)`` exceeds ``m^2`` (the right-hand sides b1, b2 fold in the
        row-only terms)."""
        ops = self.ops
        if self.z is not None and self.b1 is not None and z_u is not None:
            w = ops.cast((-2 * z_u) @ self.z[:, :n], ops.f64)
            idx = ops.nonzero(w + (nz_u - self.eps * nx_u) <= self.b1[:n])
            if len(idx) <= n // 4:  # few survivors: full-dim screen on them only
                w = ops.cast(self.xs[idx] @ (-2 * x_u), ops.f64)
                return idx[w + (1 - self.eps) * nx_u <= self.b2[idx]]
        w = ops.cast(self.xs[:n] @ (-2 * x_u), ops.f64)
        return ops.nonzero(w + (1 - self.eps) * nx_u <= self.b2[:n])

    def _remove(self, pos: Array, n: int) -> None:
        """Swap-remove slot ``pos`` of the ``n`` active ones: the last active slot moves into it.
        Removing several slots in descending order is safe: the last slot is never one of them."""
        ops = self.ops
        slots = (self.orig, self.m, self.g, self.xs, self.nx, self.nz, self.b1, self.b2, self.tg)
        for arr in (*slots, self.grp):
            if arr is not None:
                ops.move(arr, pos, n - 1)
        if self.z is not None:
            ops.move(self.z.T, pos, n - 1)

    def _update(self, u: Array, pos: Array, n: int) -> int:
        """Swap-remove slot ``pos`` (the pick, pool index ``u``) and its group mates, and lower
        ``m`` of the remaining candidates by their distance to it (one matrix-vector product).
        Returns the number of remaining candidates."""
        ops, xp = self.ops, self.ops.xp
        x_u, nx_u = ops.row(self.xs, pos), ops.row(self.nx, pos)
        z_u = None if self.z is None else ops.row(self.z.T, pos)
        nz_u = None if self.nz is None else ops.row(self.nz, pos)
        group = None if self.grp is None else int(ops.row(self.grp, pos))  # host sync (groups only)
        self._remove(pos, n)
        n -= 1
        if group is not None and group >= 0:  # the pick's group mates stop being candidates
            assert self.grp is not None
            for s in ops.host(ops.nonzero(self.grp[:n] == group))[::-1].tolist():
                self._remove(ops.put(np.asarray(s), ops.i64), n)  # descending: see _remove
                n -= 1
        if n == 0:
            return n
        xu64 = ops.cast(ops.row(self.xo, u), ops.f64)
        if self.dense:  # no data-dependent shapes: no host sync on a GPU
            d = ops.dense_direct(self.xo, xu64)
            assert d is not None
            self.m[:n] = xp.minimum(self.m[:n], d[self.orig[:n]])
            return n
        idx = self._screen(x_u, nx_u, z_u, nz_u, n)
        if len(idx):
            m = xp.minimum(self.m[idx], self._direct(self.orig[idx], u=xu64))
            self.m[idx], self.b2[idx] = m, self._rhs2(m, self.nx[idx])
            if self.b1 is not None and self.nz is not None:
                self.b1[idx] = self._rhs1(m, self.nz[idx], self.nx[idx])
        return n

    def run(self, budget: int) -> KCenterResult:
        """B' = min(budget, U) greedy picks (Algorithm 1), fewer when groups run out; one host
        copy at the end."""
        ops, n = self.ops, len(self.orig)
        b = min(budget, n)
        rec = ops.full((b, 8), math.nan, ops.f64)  # pool index (exact in float64) + stats
        t = 0
        with _one_blas_thread(self.big):
            if self.lazy_ok() and self.n_lab > 0:
                return self._result(_Lazy(self).run(b, rec))
            while t < b and n > 0:
                n = self._step(t, n, rec)
                t += 1
        return self._result(ops.host(rec[:t]))

    def lazy_ok(self) -> bool:
        """Whether the lazy greedy (:class:`_Lazy`) runs: numpy on CPU, eq. 5, no groups."""
        lazy = type(self.ops) is _NumpyOps and self.mode == "product" and self.grp is None
        return lazy and not self.dense and len(self.orig) >= _LAZY_MIN

    def _step(self, t: int, n: int, rec: Array) -> int:
        """Greedy step ``t`` over the ``n`` current candidates: pick, record, update; returns
        the number of candidates left."""
        ops, xp = self.ops, self.ops.xp
        score, stats = self._score(n, seed=t == 0 and self.n_lab == 0)
        best = score.max()
        pos = xp.where(score == best, self.orig[:n], _BIG).argmin()  # ties: lowest index
        u = ops.row(self.orig, pos)
        ops.store(rec, t, [u, ops.row(self.m, pos), ops.row(self.g, pos), *stats, best])
        return self._update(u, pos, n)

    def _result(self, rec: np.ndarray) -> KCenterResult:
        """Assemble the result; ``combined`` is the paper-form score of each pick (eq. 5: the
        product, eq. 6: the sum, rank: minus the mean rank); nan for a seed pick."""
        picks, m_u, g_u, mmin, mmax, gmin, gmax, best = rec.T
        nm = np.where(mmax > mmin, (m_u - mmin) / (mmax - mmin), 1.0)
        ng = np.where(gmax > gmin, (g_u - gmin) / (gmax - gmin), 1.0)
        if self.mode in ("sum", "rank"):
            comb = best.copy()
        elif self.alpha == 1.0:
            comb = nm
        else:
            comb = nm**self.alpha * ng ** (1 - self.alpha)
        if self.n_lab == 0 and len(comb):
            comb[0] = math.nan
        return KCenterResult(picks.astype(np.int64), m_u.astype(np.float64), comb)


def confident_kcenter(
    features: np.ndarray,
    labeled: np.ndarray,
    budget: int,
    *,
    alpha: float = 0.25,
    predicted_loss: np.ndarray | None = None,
    mode: Mode = "product",
    device: str = "cpu",
    backend: str = "auto",
    update: str = "auto",
    eligible: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> KCenterResult:
    """Greedy confident k-center over the pool (Algorithm 1 with eq. 5, or eq. 6 / rank fusion).

    features: float [N, D]; labeled: bool [N]; predicted_loss: float [N] (required unless
    ``mode == 'product'`` and ``alpha == 1``); alpha in (0, 1] (``alpha == 0`` is a plain loss
    ranking, see ``ml.selection``). ``device``: ``cpu`` (numpy, the faster CPU path) or a torch
    device; ``backend='torch'`` forces torch on ``cpu``. ``update``: ``auto`` (dense on a GPU,
    screened on CPU), ``dense`` (torch only) or ``screened``. Inputs are assumed validated
    (``ml.selection.select`` does it). ``eligible`` bool [N]: the only rows that may be picked
    (default: every unlabeled row); ``groups`` int [N] (< 0 = none): no two picks share a group,
    so fewer than ``budget`` picks come back when the groups run out (on a GPU, one host sync per
    pick). Returns the picks in order, see :class:`KCenterResult`.
    """
    if mode == "product" and not 0.0 < alpha <= 1.0:
        raise ValueError(f"confident_kcenter needs 0 < alpha <= 1, got {alpha}")
    if predicted_loss is None and not (mode == "product" and alpha == 1.0):
        raise ValueError(f"mode {mode!r} with alpha={alpha} needs predicted_loss")
    if update not in ("auto", "dense", "screened"):
        raise ValueError(f"update must be 'auto', 'dense' or 'screened', got {update!r}")
    ops = make_ops(device, backend)
    if update == "dense" and not isinstance(ops, _TorchOps):
        raise ValueError("update='dense' needs the torch backend")
    labeled = np.asarray(labeled, dtype=bool)
    if budget <= 0 or not (~labeled if eligible is None else ~labeled & eligible).any():
        empty = np.zeros(0, dtype=np.float64)
        return KCenterResult(np.zeros(0, dtype=np.int64), empty, empty.copy())
    greedy = _Greedy(
        ops, np.asarray(features), labeled, predicted_loss, alpha, mode, update, eligible, groups
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return greedy.run(budget)


class _Lazy:
    """The greedy of a :class:`_Greedy` (numpy, eq. 5, no groups, labeled set not empty) with lazy
    evaluation in blocks; the same picks and statistics as its step-by-step loop.

    Layout: the candidates are reordered once by PCA-space group (k-means), never compacted
    (a pick only clears ``alive``); each group is a contiguous row range with a centre and a
    radius in PCA coordinates, so a pick ``u`` provably cannot lower the min distance of any
    row of a group whose ball lies farther from ``u`` than the group's largest ``m``.

    A block (:meth:`block`) starts with every ``m`` exact, ``c`` = min m over the candidates and
    the exact scores ``S``. A working set T (the ``_KS`` best scores and the ``_KM`` largest m,
    ties included) is kept exact pick by pick; every other row keeps its start value, an upper
    bound of its m (m only decreases). eq. 5 in log form is increasing in m for fixed
    (min m, min g), so while those stay, an outside row's score is at most ``tau`` (the best
    outside score at the start) and its m at most ``mu``. A step is taken only when T's best
    score is finite and above ``tau`` (then it is the argmax; ties go to the lowest index within
    T, which holds every row that could tie) and T's largest m is at least ``mu`` (then it is
    max m). The block stops after a pick that removes the min or max g or brings a T row below
    ``c``. An outside row can also fall below ``c``: the closing sync (:meth:`sync`) computes the
    exact distance of every row to the block's picks (the group bound, a float32 screen with
    rigorous margins, float64 direct rechecks) and, if pick j brought a row that was still a
    candidate below ``c``, keeps only the picks up to j (the later ones used a stale ``c``);
    the first pick always stands. Degenerate steps (all m equal) go through :meth:`exact`."""

    def __init__(self, gr: _Greedy) -> None:
        self.gr, n = gr, len(gr.orig)
        zc = gr.zc
        if (
            zc is None or gr.zcen is None
        ):  # the initialisation did not prune: PCA coordinates and groups here
            p = gr._basis(gr.xs)
            zc = gr._pz(gr.orig, p)
            cen = _kmeans(zc[:: max(1, n // _PCA_ROWS)], max(1, n // _LAZY_GROUP))
        else:
            cen = gr.zcen
        members, self.cen, self.rad = _balls(zc, cen, gr.zgroup if zc is gr.zc else None)
        order = np.concatenate(members)
        self.cut = np.cumsum([0] + [len(r) for r in members])  # group q: rows cut[q]:cut[q+1]
        self.zc = zc[order]
        self.orig, self.m, self.g = gr.orig[order], gr.m[order], gr.g[order]
        self.xs, self.nx = gr.xs[order], gr.nx[order]
        gr.xs = gr.z = None  # the reordered copy replaces them
        self.b2 = gr._rhs2(self.m, self.nx)
        self.alive = np.ones(n, dtype=bool)
        self.slack = 1e-9 * (float(np.abs(zc).max()) + 1.0)  # rounding of z and P

    def run(self, b: int, rec: np.ndarray) -> np.ndarray:
        t = 0
        while t < b:
            done = self.block(t, b, rec) or self.exact(t, rec)
            t += done
        return rec[:t]

    def scores(self, m: np.ndarray, g: np.ndarray, stats: tuple[float, ...]) -> np.ndarray:
        """eq. 5 in log form, elementwise exactly as :meth:`_Greedy._score` computes it."""
        mmin, mmax, gmin, gmax = stats
        a = self.gr.alpha
        if a == 1.0:
            return m
        tm = np.where(mmax > mmin, a * np.log(m - mmin), 0.0)
        return tm + np.where(gmax > gmin, (1 - a) * np.log(g - gmin), 0.0)

    def stats(self) -> tuple[np.ndarray, tuple[float, ...]]:
        live = np.flatnonzero(self.alive)
        m, g = self.m[live], self.g[live]
        return live, (float(m.min()), float(m.max()), float(g.min()), float(g.max()))

    def exact(self, t: int, rec: np.ndarray) -> int:
        """One plain step over every candidate (all m exact); returns 1."""
        live, st = self.stats()
        score = self.scores(self.m[live], self.g[live], st)
        best = score.max()
        hit = live[score == best]
        k = int(hit[np.argmin(self.orig[hit])])
        rec[t] = [self.orig[k], self.m[k], self.g[k], *st, best]
        self.sync(np.array([k]), st[0])
        return 1

    def block(self, t: int, b: int, rec: np.ndarray) -> int:
        """Lazy steps ``t, t+1, ...`` (at most ``_BLOCK``); returns how many stand (0: none
        could be taken, the caller takes an exact step)."""
        live, st = self.stats()
        c, mmax, gmin, gmax = st
        if not mmax > c or len(live) <= 2:
            return 0
        m = self.m[live]
        score = self.scores(m, self.g[live], st)
        top = _top_mask(score, _KS) | _top_mask(m, _KM)
        tau = float(score[~top].max()) if not top.all() else -math.inf
        mu = float(m[~top].max()) if not top.all() else -math.inf
        ts = live[top]
        orig_t, g_t, nx_t = self.orig[ts], self.g[ts], self.nx[ts]
        xs_t, m_t, s_t = self.xs[ts], m[top], score[top]
        b2_t = self.b2[ts]
        on = np.ones(len(ts), dtype=bool)
        eps, xo = self.gr.eps, self.gr.xo
        picks: list[int] = []  # positions in ts
        while t + len(picks) < b and len(picks) < _BLOCK and on.any():
            best = float(s_t.max())
            mm = float(m_t[on].max())
            if not (math.isfinite(best) and best > tau and mm >= mu and mm > c):
                break
            hit = np.flatnonzero(s_t == best)
            k = int(hit[np.argmin(orig_t[hit])]) if len(hit) > 1 else int(hit[0])
            rec[t + len(picks)] = [orig_t[k], m_t[k], g_t[k], c, mm, gmin, gmax, best]
            picks.append(k)
            on[k], s_t[k] = False, -math.inf
            w = (xs_t @ (-2 * xs_t[k])).astype(np.float64)
            idx = np.flatnonzero((w + (1 - eps) * nx_t[k] <= b2_t) & on)
            if len(idx):
                d = self.gr._direct(orig_t[idx], u=xo[int(orig_t[k])].astype(np.float64))
                m_t[idx] = np.minimum(m_t[idx], d)
                b2_t[idx] = self.gr._rhs2(m_t[idx], nx_t[idx])
                s_t[idx] = self.scores(m_t[idx], g_t[idx], (c, mm, gmin, gmax))
            if g_t[k] in (gmin, gmax) or (on.any() and float(m_t[on].min()) < c):
                break
        return self.sync(ts[np.array(picks, dtype=np.int64)], c) if picks else 0

    def sync(self, slots: np.ndarray, c: float) -> int:
        """Make ``m`` exact after the picks ``slots`` (row positions, pick order) and retire
        them; returns how many stand: all, or those up to the first that brought a row still a
        candidate after it below ``c``."""
        k, gr = len(slots), self.gr
        step = np.full(len(self.m), k, dtype=np.int64)
        step[slots] = np.arange(k)
        zu = self.zc[slots]
        err = 1e-12 * ((zu * zu).sum(1)[None, :] + (self.cen * self.cen).sum(1)[:, None])
        dz = np.sqrt(np.maximum(_sqdist(self.cen, zu) - err, 0.0))  # [G, k] <= |c_G - z_u|
        lb = dz - self.rad[:, None] * (1 + 1e-12) - self.slack
        mx = np.maximum.reduceat(np.where(self.alive, self.m, -math.inf), self.cut[:-1])
        near = lb <= mx[:, None] * (1 + 1e-9)
        xu2 = -2 * self.xs[slots]
        off = (1 - gr.eps) * self.nx[slots]
        ii, jj = [], []
        for q in np.flatnonzero(near.any(1)):
            a, e = self.cut[q], self.cut[q + 1]
            js = np.flatnonzero(near[q])
            w = (self.xs[a:e] @ xu2[js].T).astype(np.float64)
            i, j = np.nonzero(w + off[js] <= self.b2[a:e, None])
            ii.append(i + a)
            jj.append(js[j])
        i = np.concatenate(ii) if ii else np.zeros(0, dtype=np.int64)
        j = np.concatenate(jj) if jj else np.zeros(0, dtype=np.int64)
        keep = step[i] > j  # rows still candidates after pick j (dead rows have b2 = -inf)
        i, j = i[keep], j[keep]
        d = gr._direct(self.orig[i], other=self.orig[slots][j])
        bad = (d < c) & (j < k - 1)
        done = int(j[bad].min()) + 1 if bad.any() else k
        i, d = i[j < done], d[j < done]
        if len(i):
            np.minimum.at(self.m, i, d)
            self.b2[i] = gr._rhs2(self.m[i], self.nx[i])
        gone = slots[:done]
        self.alive[gone] = False
        self.b2[gone] = -math.inf
        return done
