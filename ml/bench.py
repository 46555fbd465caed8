"""Selection benchmark: our confident k-center (ml.kcenter) against a reference-style one.

The reference follows google/active-learning ``sampling_methods/kcenter_greedy.py``: an
N x L ``sklearn.metrics.pairwise_distances`` at the start to initialise the min distances
(chunked with ``pairwise_distances_chunked`` when N x L float64 would not fit comfortably in
memory), then one ``pairwise_distances`` of the whole pool against the new centre per pick;
extended with eq. 5's confident weighting (literal ``N(m)^alpha * N(G)^(1-alpha)`` over the
current candidates, same seed and tie rules as ours) so that both must pick the same set.

``main`` prints one JSON line; ``coreloop bench select ...`` calls it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from typing import Any

import numpy as np

from ml.kcenter import confident_kcenter

_CHUNK = 8192


def make_pool(
    n: int, dim: int, n_labeled: int, seed: int, clusters: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic pool: float32 features [n, dim] from ``clusters`` Gaussian clusters (unit-variance
    centres, within-cluster sd 0.5, uneven cluster sizes), a random labeled mask [n] with
    ``n_labeled`` rows, random predicted losses float64 [n]. Built in chunks (no big temporaries,
    so the RSS peak before the timed runs is the RSS itself)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(clusters, 2.0))
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        x[s:e] = centres[rng.choice(clusters, size=e - s, p=weights)]
        x[s:e] += 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
    labeled = np.zeros(n, dtype=bool)
    labeled[rng.choice(n, size=min(n_labeled, n), replace=False)] = True
    return x, labeled, rng.lognormal(0.0, 1.0, size=n)


def _mem_available() -> int:
    """Bytes of available memory (``MemAvailable``), or 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _eq5(m: np.ndarray, g: np.ndarray, alpha: float) -> np.ndarray:
    """Literal eq. 5 over candidate vectors, N = min-max normalisation (1 when constant)."""

    def norm(v: np.ndarray) -> np.ndarray:
        lo, hi = v.min(), v.max()
        return np.ones_like(v) if hi == lo else (v - lo) / (hi - lo)

    return norm(m) ** alpha * norm(g) ** (1.0 - alpha)


def reference_kcenter(
    features: np.ndarray, labeled: np.ndarray, budget: int, alpha: float, predicted_loss: np.ndarray
) -> tuple[np.ndarray, str]:
    """Google-style greedy (see module doc) with eq. 5 weighting; returns (picks [B'], init
    kind ``full`` | ``chunked``). Memory: N x L float64 at the start when it fits."""
    from sklearn.metrics import pairwise_distances, pairwise_distances_chunked

    x = features.astype(np.float64)
    centres, cand = np.flatnonzero(labeled), ~labeled
    min_d, init = np.full(len(x), np.inf), "none"
    if len(centres):
        init = "full" if 16 * len(x) * len(centres) < 0.5 * _mem_available() else "chunked"
        if init == "full":
            min_d = pairwise_distances(x, x[centres]).min(axis=1)
        else:
            parts = pairwise_distances_chunked(x, x[centres], reduce_func=lambda d, _: d.min(1))
            min_d = np.concatenate(list(parts))
    picks: list[int] = []
    for _ in range(min(budget, int(cand.sum()))):
        idx = np.flatnonzero(cand)
        if len(centres) == 0 and not picks:  # same seed rule as ours
            ind = int(idx[0] if alpha == 1.0 else idx[np.argmax(predicted_loss[idx])])
        else:
            score = np.full(len(x), -np.inf)
            score[idx] = _eq5(min_d[idx], predicted_loss[idx], alpha)
            ind = int(np.argmax(score))
        dist = pairwise_distances(x, x[[ind]])[:, 0]
        min_d = np.minimum(min_d, dist)
        cand[ind] = False
        picks.append(ind)
    return np.array(picks, dtype=np.int64), init


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _time_ours(
    x: np.ndarray, labeled: np.ndarray, g: np.ndarray, budget: int, alpha: float, device: str
) -> tuple[np.ndarray, float, float, float]:
    """Run ours once: (picks, wall s, process CPU s, peak extra MB). Memory on CPU: growth of
    the process's max RSS over its current RSS (the pool is built without temporaries, so the
    earlier peak is ~ the RSS); on a GPU: ``torch.cuda.max_memory_allocated``."""
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = max(_rss_mb(), _maxrss_mb())
    t0, c0 = time.perf_counter(), time.process_time()
    res = confident_kcenter(x, labeled, budget, alpha=alpha, predicted_loss=g, device=device)
    if cuda:
        torch.cuda.synchronize()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    if cuda:
        return res.indices, secs, cpu, torch.cuda.max_memory_allocated() / 2**20
    return res.indices, secs, cpu, max(0.0, _maxrss_mb() - base)


def run_select_bench(
    n: int = 100000,
    dim: int = 512,
    labeled: int = 10000,
    budget: int = 5000,
    device: str = "cpu",
    seed: int = 0,
    alpha: float = 0.25,
    reference: bool = True,
    check_cpu: bool = False,
    warmup: bool = False,
) -> dict[str, Any]:
    """Time our confident k-center (eq. 5) and, if ``reference``, the reference-style one on the
    same synthetic pool; check they pick the same set. ``check_cpu`` (device not ``cpu``): also
    time our CPU path and check it picks the same rows in the same order. ``warmup``: one small
    untimed run first (CUDA context, kernels). Returns the JSON-able result."""
    x, mask, g = make_pool(n, dim, labeled, seed)
    if warmup:
        k = min(n, 2048)
        confident_kcenter(
            x[:k], mask[:k], min(budget, 16), alpha=alpha, predicted_loss=g[:k], device=device
        )
    load = os.getloadavg()[0]
    ours, ours_s, ours_cpu, peak_mb = _time_ours(x, mask, g, budget, alpha, device)
    out: dict[str, Any] = {
        "n": n,
        "dim": dim,
        "labeled": int(mask.sum()),
        "budget": budget,
        "picked": len(ours),
        "device": device,
        "seed": seed,
        "alpha": alpha,
        "ours_s": round(ours_s, 3),
        "ours_cpu_s": round(ours_cpu, 3),
        "ours_peak_extra_mb": round(peak_mb, 1),
        "reference_s": None,
        "reference_cpu_s": None,
        "speedup": None,
        "same_picks": None,
        "same_order": None,
        "reference_init": None,
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": round(load, 2),
        "loadavg_1m_at_end": None,
    }
    if check_cpu and device != "cpu":
        cpu, cpu_s, _, _ = _time_ours(x, mask, g, budget, alpha, "cpu")
        out.update(cpu_s=round(cpu_s, 3), same_order_as_cpu=bool(np.array_equal(cpu, ours)))
    if reference:
        t0, c0 = time.perf_counter(), time.process_time()
        ref, init = reference_kcenter(x, mask, budget, alpha, g)
        ref_s = time.perf_counter() - t0
        out.update(
            reference_s=round(ref_s, 3),
            reference_cpu_s=round(time.process_time() - c0, 3),
            speedup=round(ref_s / max(ours_s, 1e-9), 2),
            same_picks=bool(set(ref.tolist()) == set(ours.tolist())),
            same_order=bool(np.array_equal(ref, ours)),
            reference_init=init,
        )
    out["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``--n --dim --labeled --budget --device --seed --alpha --no-reference``; prints one
    JSON line with the timings, the speedup and whether both picked the same set."""
    p = argparse.ArgumentParser(prog="coreloop bench select", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100000, help="pool size N")
    p.add_argument("--dim", type=int, default=512, help="feature dimension D")
    p.add_argument("--labeled", type=int, default=10000, help="labeled rows L")
    p.add_argument("--budget", type=int, default=5000, help="picks B")
    p.add_argument("--device", default="cpu", help="cpu (numpy) or a torch device, e.g. cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.25, help="eq. 5 weight, in (0, 1]")
    p.add_argument("--no-reference", action="store_true", help="skip the reference run")
    p.add_argument(
        "--check-cpu", action="store_true", help="device not cpu: also run (and time) the CPU path"
    )
    p.add_argument("--warmup", action="store_true", help="one small untimed run first")
    a = p.parse_args(argv)
    if not 0.0 < a.alpha <= 1.0 or min(a.n, a.dim) < 1 or min(a.labeled, a.budget) < 0:
        p.error("need n, dim >= 1, labeled, budget >= 0 and 0 < alpha <= 1")
    out = run_select_bench(
        a.n,
        a.dim,
        a.labeled,
        a.budget,
        a.device,
        a.seed,
        a.alpha,
        reference=not a.no_reference,
        check_cpu=a.check_cpu,
        warmup=a.warmup,
    )
    print(json.dumps(out), flush=True)
    same = out["same_picks"] in (True, None) and out.get("same_order_as_cpu", True)
    return 0 if same and math.isfinite(out["ours_s"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
