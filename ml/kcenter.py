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
product. On CPU the update is screened in two stages (a PCA lower bound on ``_K + 1`` dims, then
the full dims in float32 on the survivors only); on CUDA it is one dense direct distance pass
with no host sync (picks stay on the device until the end).
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
        self.m = self._init_min_distance()  # [U] float64, exact direct distances
        self.dense = update == "dense" or (update == "auto" and ops.sync_free)
        self.z: Array | None = None  # [K+1, U] stage-1 columns, see _project
        self.nz: Array | None = None
        self.big = len(cand) * dim > 2**20 and not ops.sync_free  # limit BLAS threads, see below
        if not self.dense and dim > 2 * _K and len(cand) > 4 * _K:
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
        xs, nx = ops.full((r, self.xo.shape[1]), 0.0, ops.screen), ops.full(r, 0.0, ops.f64)
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
        for s in range(0, n_c, _CB):
            e = min(s + _CB, n_c)
            xaug = ops.xp.concatenate([self.xs[s:e], ones[: e - s]], axis=1)  # [cb, D+1]
            i, j = self._near_pairs(xaug, self.nx[s:e], laug, nlmax)
            ops.scatter_min(m[s:e], i, self._direct(self.orig[s:e][i], other=self.lab[j]))
        return m

    def _near_pairs(self, xaug: Array, nxb: Array, laug: Array, nlmax: float) -> Pair:
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
        return i[keep], j[keep]

    def _project(self) -> Pair:
        """Stage-1 screen data: ``[P^T x, |x - P P^T x|]`` [U, K+1] (screen dtype) and its float64
        squared norms [U]; P [D, K] = top PCA directions of a row sample. For orthonormal P the
        distance between two such rows is a lower bound of the full distance."""
        ops, xp, n_c = self.ops, self.ops.xp, len(self.orig)
        sample = ops.cast(self.xs[:: max(1, n_c // _PCA_ROWS)][:_PCA_ROWS], ops.f64)
        p = ops.eigh_vectors(sample.T @ sample)[:, -_K:]
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
            while t < b and n > 0:
                n = self._step(t, n, rec)
                t += 1
        return self._result(ops.host(rec[:t]))

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
