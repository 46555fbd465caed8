"""A GPU round end to end, as one prepared run: selection at full size, then whole rounds.

    python -m benchmarks.gpu_round --out DIR [--device cuda] [--tiny] [--budget-s 420]

Writes ``DIR/gpu_round.json`` (rewritten after every phase, so a run cut short still leaves what
it measured) and prints it. It runs:

1. ``coreloop bench select --device DEVICE --warmup --check-cpu --no-reference`` at N=100k,
   d=512, L=10k, B=5k (:func:`ml.bench.run_select_bench`): the timed selection on the device,
   and whether the CPU path picks the same rows in the same order (goal on an H100: <= 0.3 s);
2. a whole round at each image size (64 and 224 px) on a 7,000-image synthetic pool (coloured
   discs on noise, 3 classes): train on the labeled 10% (:func:`ml.train.train_model`, with
   the training default's loader: batches made on the device), score the whole pool
   (:func:`ml.infer.score_pool`), select the budget with confident coreset
   (:func:`ml.selection.select`). Each phase is timed between CUDA synchronisations and
   reported in images/s (training: images seen, incl. and excl. the first epoch, which holds
   cuDNN's autotuning; scoring: pool images; selection: seconds and pool rows/s);
3. training throughput at each size on the whole pool as labeled (3 epochs), with the set held
   on the device and augmented there (``loader="device"``, the default on a GPU) and, as the
   baseline in the same run, the per-sample ``DataLoader`` on the CPU (``loader="dataloader"``,
   ``--workers`` processes: 4 by default on a GPU, as the measured ``gpu-short`` run); the
   ratio of the two (goal at 64 px: >= 10,000 images/s).

Phases run by image size (round, then throughput), each starting only within ``--budget-s``.

``--tiny`` runs the same code on a small pool (CPU-sized) for the tests. ``--budget-s`` skips
the phases that would start after that many seconds (default 420: the script is meant to stay
under 8 minutes of GPU time; not yet run on a GPU: a few minutes is an estimate).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml.bench import run_select_bench
from ml.data import ImageDataset
from ml.infer import score_pool
from ml.selection import select
from ml.train import Loader, TrainConfig, resolve_device, train_model

COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.uint8)
FULL: dict[str, Any] = {
    "select": {"n": 100000, "dim": 512, "labeled": 10000, "budget": 5000},
    "pool": 7000,
    "sizes": [64, 224],
    "labeled": 700,
    "budget": 350,
    "epochs": 10,
    "batch_size": 128,
    "throughput": {"pool": 7000, "epochs": 3},
}
TINY: dict[str, Any] = {
    "select": {"n": 3000, "dim": 64, "labeled": 300, "budget": 100},
    "pool": 48,
    "sizes": [32, 64],
    "labeled": 24,
    "budget": 8,
    "epochs": 2,
    "batch_size": 8,
    "throughput": {"pool": 32, "epochs": 2},
}


@functools.lru_cache(maxsize=1)  # a round and its throughput runs share a pool of one size
def synthetic_pool(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [n, size, size, 3] (uniform noise 96-159, one disc of the class colour) and
    classes int64 [n]; built in chunks without float copies (7,000 x 224 px is 1 GB)."""
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.arange(n) % 3).astype(np.int64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    for s in range(0, n, 256):
        e = min(s + 256, n)
        images[s:e] = rng.integers(96, 160, (e - s, size, size, 3), dtype=np.uint8)
        r = rng.uniform(0.15, 0.3, e - s).astype(np.float32) * size
        cy, cx = (rng.uniform(r, size - r).astype(np.float32) for _ in range(2))
        disc = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= r[
            :, None, None
        ] ** 2
        block = images[s:e]
        block[disc] = COLOURS[np.repeat(classes[s:e], disc.sum((1, 2)))]
    return images, classes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, between two device synchronisations."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _peak_mb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return round(peak, 1)


def _train_config(
    cfg: dict[str, Any],
    epochs: int,
    size: int,
    device: torch.device,
    seed: int,
    loader: Loader = "auto",
) -> TrainConfig:
    return TrainConfig(
        epochs=epochs,
        batch_size=cfg["batch_size"],
        image_size=size,
        seed=seed,
        device=str(device),
        num_workers=cfg.get("workers", 0),
        loader=loader,
    )


def run_round(cfg: dict[str, Any], size: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Train + score + select on a synthetic pool at ``size`` px; timings and rates."""
    n, n_lab, epochs = cfg["pool"], cfg["labeled"], cfg["epochs"]
    t0 = time.perf_counter()
    images, classes = synthetic_pool(n, size, seed)
    out: dict[str, Any] = {
        "image_size": size,
        "pool": n,
        "labeled": n_lab,
        "budget": cfg["budget"],
        "epochs": epochs,
        "batch_size": cfg["batch_size"],
        "workers": cfg.get("workers", 0),
        "data_s": round(time.perf_counter() - t0, 3),
    }
    train_set = ImageDataset(images[:n_lab], classes[:n_lab], augment="derm")
    config = _train_config(cfg, epochs, size, device, seed)
    result, train_s = _timed(device, lambda: train_model("classification", 3, train_set, config))
    seen = n_lab * epochs  # at most: train_model drops a last batch of one
    later = sum(h["seconds"] for h in result.history[1:])
    out.update(
        loader=result.loader,
        train_s=round(train_s, 3),
        train_images_per_s=round(seen / train_s, 1),
        train_images_per_s_after_first_epoch=(
            round(n_lab * (epochs - 1) / later, 1) if epochs > 1 and later > 0 else None
        ),
        train_peak_mb=_peak_mb(device),
    )
    pool = ImageDataset(images)
    scored, score_s = _timed(
        device,
        lambda: score_pool(result.model, pool, batch_size=cfg["batch_size"], device=str(device)),
    )
    out.update(
        score_s=round(score_s, 3),
        score_images_per_s=round(n / score_s, 1),
        score_peak_mb=_peak_mb(device),
    )
    labeled = np.zeros(n, dtype=bool)
    labeled[:n_lab] = True
    sel_dev = str(device) if device.type == "cuda" else "cpu"
    sel, select_s = _timed(
        device,
        lambda: select(
            "confident_coreset",
            features=scored.features,
            labeled=labeled,
            budget=cfg["budget"],
            alpha=0.25,
            predicted_loss=scored.predicted_loss,
            device=sel_dev,
        ),
    )
    out.update(
        select_s=round(select_s, 3),
        select_rows_per_s=round(n / select_s, 1),
        picked=len(sel.indices),
        round_s=round(train_s + score_s + select_s, 3),
        round_images_per_s=round(n / (train_s + score_s + select_s), 1),
    )
    return out


def run_throughput(
    cfg: dict[str, Any], size: int, device: torch.device, seed: int, loader: Loader
) -> dict[str, Any]:
    """Training alone, on the whole throughput pool as labeled, with ``loader``: images/s."""
    n, epochs = cfg["throughput"]["pool"], cfg["throughput"]["epochs"]
    images, classes = synthetic_pool(n, size, seed)
    config = _train_config(cfg, epochs, size, device, seed, loader)
    data = ImageDataset(images, classes, augment="derm")
    result, train_s = _timed(device, lambda: train_model("classification", 3, data, config))
    later = sum(h["seconds"] for h in result.history[1:])
    return {
        "image_size": size,
        "loader": result.loader,
        "images": n,
        "epochs": epochs,
        "batch_size": cfg["batch_size"],
        "workers": cfg.get("workers", 0) if result.loader == "dataloader" else None,
        "train_s": round(train_s, 3),
        "images_per_s": round(n * epochs / train_s, 1),
        "images_per_s_after_first_epoch": (
            round(n * (epochs - 1) / later, 1) if epochs > 1 and later > 0 else None
        ),
        "peak_mb": _peak_mb(device),
    }


def _env(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_round.json")
    p.add_argument("--device", default="auto", help="cuda (auto when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="small sizes (CPU, tests)")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no phase after this")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers (the throughput baseline's): default 4 on a GPU, 0 on the CPU",
    )
    p.add_argument("--sizes", default=None, help="comma-separated image sizes (default 64,224)")
    p.add_argument("--skip-select-bench", action="store_true")
    p.add_argument("--skip-rounds", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--throughput-pool", type=int, default=None, help="images (default 7,000)")
    p.add_argument("--throughput-epochs", type=int, default=None, help="epochs (default 3)")
    argv = sys.argv[1:] if argv is None else argv
    a = p.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    cfg: dict[str, Any] = dict(TINY if a.tiny else FULL)
    if a.sizes:
        cfg["sizes"] = [int(v) for v in a.sizes.split(",")]
    cfg["workers"] = a.workers if a.workers is not None else 4 if device.type == "cuda" else 0
    cfg["throughput"] = {
        "pool": a.throughput_pool or cfg["throughput"]["pool"],
        "epochs": a.throughput_epochs or cfg["throughput"]["epochs"],
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "gpu_round.json"
    began = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.gpu_round", *argv]),
        "tiny": a.tiny,
        "env": _env(device),
        "select_bench": None,
        "rounds": [],
        "throughput": [],
        "skipped": [],
        "errors": [],
    }

    def save() -> None:
        report["total_s"] = round(time.perf_counter() - began, 3)
        report["env"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        path.write_text(json.dumps(report, indent=2) + "\n")

    phases: list[tuple[str, Callable[[], None]]] = []
    if not a.skip_select_bench:

        def bench() -> None:
            report["select_bench"] = run_select_bench(
                **cfg["select"],
                device=str(device) if device.type == "cuda" else "cpu",
                seed=a.seed,
                reference=False,
                check_cpu=device.type == "cuda",
                warmup=True,
            )

        phases.append(("select_bench", bench))

    def round_at(size: int) -> Callable[[], None]:
        return lambda: report["rounds"].append(run_round(cfg, size, device, a.seed))

    def throughput_at(size: int) -> Callable[[], None]:
        def measure() -> None:
            runs = [
                run_throughput(cfg, size, device, a.seed, lo) for lo in ("device", "dataloader")
            ]
            ours, base = runs
            ratio = ours["images_per_s"] / base["images_per_s"]
            report["throughput"].append(
                {"device": ours, "dataloader": base, "ratio": round(ratio, 2)}
            )

        return measure

    for size in cfg["sizes"]:  # by size, so that consecutive phases can share a cached pool
        if not a.skip_rounds:
            phases.append((f"round_{size}px", round_at(size)))
        if not a.skip_throughput:
            phases.append((f"throughput_{size}px", throughput_at(size)))
    for name, fn in phases:
        if time.perf_counter() - began > a.budget_s:
            report["skipped"].append(name)
            continue
        try:
            fn()
        except Exception as err:  # keep what the other phases measure
            report["errors"].append({"phase": name, "error": f"{type(err).__name__}: {err}"})
        save()
    save()
    print(path.read_text(), flush=True)
    bench_ok = report["select_bench"] is None or report["select_bench"].get(
        "same_order_as_cpu", True
    )
    return 0 if not report["errors"] and bench_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
