"""The learner's recipe on real HAM10000: full-data training at one setting, one row per run.

For issue 12 (a model worth annotating for): on a lesion-grouped, class-stratified split (the
same :func:`ml.ham10000.lesion_split` as ``coreloop simulate``), train on the whole pool with one
recipe and report accuracy, balanced accuracy and per-class recall on the test split, with the
CPU and wall time. Every run appends one row to ``--out`` (CSV), so a table of recipes is a
series of commands with the same ``--out``.

    .venv/bin/python -m benchmarks.learner --data ../shared/data/ham10000 \\
        --seed 100 --epochs 8 --class-balance sampler --augment derm --out artifacts/learner.csv

``--warm-start FILE`` trains from a ResNet-18 state_dict (e.g. the warm-start job's output);
``--pretrain-epochs N`` first runs the self-supervised warm start on the pool images (never the
test images) and counts its time in the row (the file is cached under ``artifacts/cache``, keyed
by the pool and the settings).

On a GPU (about 6 minutes of GPU time, estimated from gpu-short's measured 2,200 images/s at
224 px; not yet run):

    .venv/bin/python -m benchmarks.learner --data ../shared/data/ham10000 --seed 100 \
        --device cuda --image-size 128 --epochs 30 --batch-size 128 --num-workers 8 \
        --pretrain-epochs 50 --out artifacts/learner-gpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ml.augment import POLICIES
from ml.ham10000 import lesion_split, load_ham10000
from ml.train import CLASS_BALANCES, LOADERS, TrainConfig, evaluate, train_model


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--seed", type=int, default=100, help="split and training seed")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--class-balance", choices=CLASS_BALANCES, default="sampler")
    p.add_argument("--balance-power", type=float, default=1.0, help="1: full rebalancing")
    p.add_argument("--augment", choices=POLICIES, default="derm")
    p.add_argument("--warm-start", type=Path, help="a ResNet-18 state_dict to start from")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="run the warm start first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="per-sample loader workers")
    p.add_argument(
        "--loader",
        choices=LOADERS,
        default="auto",
        help="where batches are made: dataloader, device, or auto (ml.train.resolve_loader)",
    )
    p.add_argument("--limit", type=int)
    p.add_argument("--label", default="", help="a name for this row")
    p.add_argument("--out", type=Path, default=Path("artifacts/learner.csv"))
    args = p.parse_args(argv)

    began, cpu0 = time.perf_counter(), cpu_seconds()
    data = load_ham10000(args.data, "classification", args.image_size, Path("artifacts/cache"),
                         limit=args.limit, progress=True)  # fmt: skip
    index = data.index
    pool, test = lesion_split(index.lesion_ids, 0.2, args.seed, index.labels)
    weights = args.warm_start
    pretrain_s = 0.0
    if args.pretrain_epochs:
        from ml.pretrain import PretrainConfig, pretrain_cached

        def on_pretrain_epoch(epoch: int, epochs: int, m: dict[str, float]) -> None:
            print(f"warm start epoch {epoch}/{epochs} {m}", flush=True)

        t0 = time.perf_counter()
        weights = pretrain_cached(
            data.images[pool],  # the pool only, never the test images
            PretrainConfig(epochs=args.pretrain_epochs, image_size=args.image_size,
                           seed=args.seed, device=args.device),
            Path("artifacts/cache"), on_epoch=on_pretrain_epoch,
        )  # fmt: skip
        pretrain_s = time.perf_counter() - t0
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        augment=args.augment, class_balance=args.class_balance, seed=args.seed,
        balance_power=args.balance_power,
        device=args.device, weights_path=None if weights is None else str(weights),
        num_workers=args.num_workers, loader=args.loader,
    )  # fmt: skip
    t0 = time.perf_counter()

    def on_epoch(epoch: int, epochs: int, m: dict[str, float]) -> None:
        print(f"epoch {epoch}/{epochs} loss {m['loss']:.3f} ({m['seconds']:.0f} s)", flush=True)

    result = train_model("classification", data.num_classes, data.dataset(pool), config,
                         on_epoch=on_epoch)  # fmt: skip
    train_s = time.perf_counter() - t0
    scores = evaluate(result.model, data.dataset(test), device=args.device)
    recall = dict(zip(index.classes, scores["per_class_recall"], strict=True))
    row: dict[str, Any] = dict(
        label=args.label, seed=args.seed, image_size=args.image_size, epochs=args.epochs,
        lr=args.lr, class_balance=args.class_balance, augment=args.augment,
        balance_power=args.balance_power,
        warm_start="" if weights is None else ("pretrain" if args.pretrain_epochs else "file"),
        pretrain_epochs=args.pretrain_epochs, n_pool=len(pool), n_test=len(test),
        accuracy=round(scores["accuracy"], 4),
        balanced_accuracy=round(scores["balanced_accuracy"], 4),
        min_recall=round(min(r for r in recall.values() if r is not None), 4),
        class_recall=json.dumps({k: None if v is None else round(v, 3)
                                 for k, v in recall.items()}),
        pretrain_seconds=round(pretrain_s, 1), train_seconds=round(train_s, 1),
        wall_seconds=round(time.perf_counter() - began, 1),
        cpu_seconds=round(cpu_seconds() - cpu0, 1), threads=torch.get_num_threads(),
        load_avg=round(os.getloadavg()[0], 2), loader=result.loader,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.is_file()
    if not new:  # a row under another header would be read as other columns
        with args.out.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != list(row):
            print(json.dumps(row), file=sys.stdout)
            raise SystemExit(f"{args.out} has other columns ({len(header)}): use another --out")
    with args.out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(json.dumps(row), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
