"""The paper's active-learning protocol on HAM10000 with an oracle annotator (issue 5).

Per seed: a lesion-grouped, class-stratified split (``--test-fraction`` 20% test, the rest is the
pool); a random initial set of ``--initial-fraction`` (10%) of the pool, the same for every
strategy (a paired design); then rounds of: train from scratch on the labeled images (the same
:class:`ml.train.TrainConfig` for every strategy, flip augmentation included, training seed
derived from (seed, round) so strategies differ only by what they labeled), evaluate on the test
split, score the whole pool and select ``--budget-fraction`` (5%) of the pool, until
``--final-fraction`` is labeled. A full-data model per seed (strategy ``full``) is the 100% line.

Resumable: ``results.csv`` gets one row per round (flushed and fsynced); the picks of every round
are stored beforehand in ``selections/<task>-<strategy>-seed<k>.json`` (written to a temporary
file, then renamed), so a rerun with the same ``--out`` skips finished rounds and rebuilds the
labeled set of an unfinished strategy from its picks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ml.augment import POLICIES, AugmentPolicy
from ml.coldstart import embed_pool, probcover, typiclust
from ml.data import ImageDataset, Task
from ml.determinism import DEFAULT_THREADS, make_deterministic
from ml.ham10000 import LoadedData, lesion_split, load_ham10000
from ml.infer import score_pool
from ml.models import ActiveModel, SegLoss
from ml.pretrain import PretrainConfig, pretrain_cached
from ml.report import build_report, class_counts_cell
from ml.selection import IMAGE_STRATEGIES, select, strategy_names
from ml.train import (
    CLASS_BALANCES,
    ClassBalance,
    TrainConfig,
    evaluate,
    resolve_device,
    train_model,
)

FULL = "full"
FULL_ROUND = 999  # the full-data model's training-seed round
CSV_NAME = "results.csv"
RUN_FILE = "run.json"
DEFAULT_ALPHA = {"classification": 0.25, "segmentation": 0.5}
METRIC_COLUMNS = {
    "classification": ("accuracy", "balanced_accuracy"),
    "segmentation": ("jaccard", "dice"),
}
COLUMNS = (
    "task", "strategy", "seed", "round", "labels", "fraction", "accuracy", "balanced_accuracy",
    "jaccard", "dice", "train_seconds", "select_seconds", "wall_seconds", "n_pool", "n_test",
    "image_size", "epochs", "alpha", "class_recall", "class_counts",
)  # fmt: skip
# Settings a resumed run must share with the run that wrote its out folder.
FIXED_SETTINGS = (
    "task", "data", "masks", "image_size", "epochs", "batch_size", "alpha", "initial_fraction",
    "budget_fraction", "final_fraction", "test_fraction", "limit", "augment", "class_balance",
    "seg_loss", "group_lesions", "warm_start_epochs",
)  # fmt: skip
_CLS5 = "random,entropy,coreset,learning_loss,confident_coreset"
# The recipe the measured presets ran with (docs/results), before issue 12 changed the defaults:
# the paper's flip, no imbalance handling, Dice alone. Pinned so their commands still reproduce
# their figures.
_PAPER_RECIPE = dict(augment="flip", class_balance="none", seg_loss="dice")
_PREREG_RECIPE = dict(augment="derm", class_balance="sampler", seg_loss="dice_bce",
                      warm_start_epochs=0, group_lesions="off", threads=2)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # Arithmetic in docs/benchmarks.md: ~65 min estimated at ~190 img/s train, ~720 img/s eval.
    "cpu-cls": dict(task="classification", strategies=_CLS5, seeds="0,1,2", image_size=64,
                    epochs=3, final_fraction=0.35, device="cpu", **_PAPER_RECIPE),
    # ISIC-2017-sized (2,500 images: pool ~2,000, test ~500); ~60 min estimated.
    "cpu-seg": dict(task="segmentation", strategies="random,confident_coreset", seeds="0,1,2",
                    image_size=64, epochs=10, limit=2500, final_fraction=0.40, device="cpu",
                    **_PAPER_RECIPE),
    # A short GPU check: 224 px, 10 epochs, one seed; ~5 min per seed on one H200 (measured).
    "gpu-short": dict(task="classification", strategies="random,confident_coreset", seeds="0",
                      image_size=224, epochs=10, batch_size=64, final_fraction=0.40,
                      device="cuda", num_workers=4, **_PAPER_RECIPE),
    "gpu": dict(strategies=",".join(strategy_names()), seeds="0,1,2,3,4", image_size=224,
                epochs=50, batch_size=64, final_fraction=0.40, device="cuda", num_workers=4,
                **_PAPER_RECIPE),
    # Issue 13's pre-registered runs (docs/benchmarks.md, "Pre-registered protocol"): the
    # learner's recipe (derm augmentation, class-balanced sampler, Dice + BCE), no warm start,
    # 2 threads, 10% -> 30%, no full-data model, seeds 10-15. 2 epochs for classification: the
    # protocol's time rule (a seed-99 smoke run projected 87 min at 3 epochs, over 85).
    "prereg-cls": dict(task="classification", strategies="random,confident_coreset,vaal",
                       seeds="10,11,12,13,14,15", image_size=64, epochs=2,
                       final_fraction=0.30, no_full=True, device="cpu", **_PREREG_RECIPE),
    "prereg-seg": dict(task="segmentation", strategies="random,confident_coreset",
                       seeds="10,11,12,13,14,15", image_size=64, epochs=10, limit=2500,
                       final_fraction=0.30, no_full=True, device="cpu", **_PREREG_RECIPE),
}  # fmt: skip


@dataclass
class SimulationConfig:
    """One simulation's settings (``alpha`` None: 0.25 classification, 0.5 segmentation)."""

    data: Path
    out: Path
    task: Task = "classification"
    masks: Path | None = None
    strategies: tuple[str, ...] = ("random", "confident_coreset")
    seeds: tuple[int, ...] = (0,)
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 32
    device: str = "auto"
    alpha: float | None = None
    initial_fraction: float = 0.10
    budget_fraction: float = 0.05
    final_fraction: float = 0.40
    test_fraction: float = 0.20
    limit: int | None = None
    full: bool = True
    num_workers: int = 0
    progress: bool = True
    augment: AugmentPolicy = "derm"
    class_balance: ClassBalance = "sampler"
    seg_loss: SegLoss = "dice_bce"
    deterministic: bool = False
    threads: int | None = None
    group_lesions: str = "off"
    warm_start_epochs: int = 0

    @property
    def resolved_alpha(self) -> float:
        return DEFAULT_ALPHA[self.task] if self.alpha is None else self.alpha

    def fixed_settings(self) -> dict[str, Any]:
        """The settings that define the experiment (JSON-ready)."""
        values = {k: v for k, v in asdict(self).items() if k in FIXED_SETTINGS}
        values.update(data=_stored_path(self.data), alpha=self.resolved_alpha)
        values["masks"] = None if self.masks is None else _stored_path(self.masks)
        return values


_PATH_SETTINGS = ("data", "masks")


def _stored_path(path: str | Path) -> str:
    """A data folder as ``run.json`` names it: relative to the working directory (the project
    root, whose ``../shared/data`` the presets read), so a committed run file names no path of
    one machine; compared after resolving (:func:`check_run_file`)."""
    return os.path.relpath(Path(path).resolve())


def _same_setting(key: str, saved: Any, now: Any) -> bool:
    if key in _PATH_SETTINGS and saved is not None and now is not None:
        return Path(saved).resolve() == Path(now).resolve()  # older run files: absolute
    return bool(saved == now)


def class_recall_cell(classes: Sequence[str], per_class: Sequence[float | None]) -> str:
    """The ``class_recall`` cell: ``{"akiec": 0.31, ..., "df": null}`` (null: no test image of
    that class), compact JSON so that one column serves any class set."""
    pairs = zip(classes, per_class, strict=True)  # a length mismatch raises ValueError
    values = {c: None if r is None else round(float(r), 6) for c, r in pairs}
    return json.dumps(values, separators=(",", ":"))


COLD_STARTS = ("typiclust", "probcover")


def split_arm(arm: str) -> tuple[str, str | None]:
    """``"confident_coreset@typiclust"`` -> ``("confident_coreset", "typiclust")``: an arm is a
    strategy, optionally with a cold start that picks its initial set (``ml.coldstart``)."""
    strategy, _, cold = arm.partition("@")
    return strategy, cold or None


def round_count(initial: float, budget: float, final: float) -> int:
    """Trainings per strategy and seed: 10%, 15%, ... 40% -> 7."""
    return int(np.floor((final - initial) / budget + 1e-9)) + 1 if final >= initial else 1


def schedule(n_pool: int, initial: float, budget: float, final: float) -> list[int]:
    """Labeled-set size per round: ``round(initial * n)``, then + ``round(budget * n)`` per
    round while the fraction stays <= ``final``."""
    n0 = max(2, round(initial * n_pool))
    step = max(1, round(budget * n_pool))
    return [min(n_pool, n0 + k * step) for k in range(round_count(initial, budget, final))]


def initial_rows(pool: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The seed's random initial labeled set (data rows), shared by every strategy."""
    return np.sort(np.random.default_rng([seed, 2]).choice(pool, size=size, replace=False))


def train_seed(seed: int, rnd: int) -> int:
    """Training seed of round ``rnd`` of run seed ``seed``: the same for every strategy."""
    return seed * 1000 + rnd


class Results:
    """``results.csv`` (append-only, fsynced) and the selection sidecars of one out folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.csv = out / CSV_NAME
        (out / "selections").mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self.columns, rows = self._read()
        self.done = {(r["task"], r["strategy"], int(r["seed"]), int(r["round"])) for r in rows}

    def _repair_tail(self) -> None:
        """Cut a partial last line (a kill during a write) so appended rows stay well-formed."""
        if not self.csv.is_file() or self.csv.stat().st_size == 0:
            return
        data = self.csv.read_bytes()
        if not data.endswith(b"\n"):
            with self.csv.open("r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)

    def _read(self) -> tuple[tuple[str, ...], list[dict[str, str]]]:
        """The existing CSV's columns (an older version may lack newer ones; COLUMNS for a new
        file) and its rows."""
        if not self.csv.is_file():
            return COLUMNS, []
        with self.csv.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [r for r in reader if r.get("round")]
            return tuple(reader.fieldnames or COLUMNS), rows

    def append(self, row: dict[str, Any]) -> None:
        """Append one row (fsynced); an older CSV keeps its header, without the newer columns."""
        new = not self.csv.is_file() or self.csv.stat().st_size == 0
        with self.csv.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in self.columns})
            handle.flush()
            os.fsync(handle.fileno())
        self.done.add((row["task"], row["strategy"], int(row["seed"]), int(row["round"])))

    def sidecar(self, task: str, strategy: str, seed: int) -> Path:
        return self.out / "selections" / f"{task}-{strategy}-seed{seed}.json"

    def load_picks(self, path: Path) -> dict[str, list[int]]:
        """``{"0": initial rows, "1": picks of round 1, ...}`` (data rows), or {} if none."""
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_picks(self, path: Path, picks: dict[str, list[int]]) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w") as handle:
            json.dump(picks, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def check_run_file(config: SimulationConfig, write: bool = False) -> None:
    """Refuse an out folder whose ``run.json`` has other fixed settings; with ``write``, create
    it when absent (done once the data has loaded, so a wrong ``--data`` leaves no run.json)."""
    path = config.out / RUN_FILE
    settings = config.fixed_settings()
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in settings if not _same_setting(k, saved.get(k), settings[k]))
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in diff)
            raise ValueError(
                f"{config.out} holds a run with other settings ({changes}); use another --out"
            )
    elif write:
        config.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2) + "\n")


@dataclass
class SeedSplit:
    """One seed's split: pool and test data rows, the unlabeled pool set, the round sizes."""

    seed: int
    pool: np.ndarray
    test: ImageDataset
    pool_set: ImageDataset
    sizes: list[int]
    weights_path: str | None = None


class Simulation:
    """Runs the protocol for every seed and strategy, skipping rounds already in the CSV."""

    def __init__(
        self,
        config: SimulationConfig,
        data: LoadedData,
        results: Results,
        after_round: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.config, self.data, self.results, self.after_round = config, data, results, after_round
        self.task: Task = config.task
        self.device = str(resolve_device(config.device))
        self.bar = tqdm(desc="rounds", unit="round", disable=not config.progress)

    def split(self, seed: int) -> SeedSplit:
        """The lesion-grouped, class-stratified split of ``seed``."""
        c, index = self.config, self.data.index
        pool, test = lesion_split(index.lesion_ids, c.test_fraction, seed, index.labels)
        sizes = schedule(len(pool), c.initial_fraction, c.budget_fraction, c.final_fraction)
        pool_set = self.data.dataset(pool, labeled=False)
        weights = None
        if c.warm_start_epochs > 0:  # SimCLR on this seed's pool images (never the test split)
            pre = PretrainConfig(epochs=c.warm_start_epochs, image_size=c.image_size, seed=seed,
                                 device=c.device)  # fmt: skip
            self.bar.set_postfix_str(f"seed {seed} warm start")
            weights = str(pretrain_cached(pool_set.images, pre, c.out / "cache"))
        return SeedSplit(seed, pool, self.data.dataset(test), pool_set, sizes, weights)

    def train(
        self, rows: np.ndarray, seed: int, weights_path: str | None = None
    ) -> tuple[ActiveModel, float]:
        """Train on ``rows`` with the shared recipe; returns the model and its seconds."""
        c = self.config
        config = TrainConfig(epochs=c.epochs, batch_size=c.batch_size, image_size=c.image_size,
                             seed=seed, device=c.device, num_workers=c.num_workers,
                             augment=c.augment, class_balance=c.class_balance,
                             seg_loss=c.seg_loss, weights_path=weights_path)  # fmt: skip
        with tqdm(total=c.epochs, desc="epochs", leave=False, disable=not c.progress) as bar:

            def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                bar.update(1)

            began = time.perf_counter()
            train_set = self.data.dataset(rows)
            result = train_model(self.task, self.data.num_classes, train_set, config,
                                 on_epoch=on_epoch)  # fmt: skip
        return result.model, time.perf_counter() - began

    def row(self, s: SeedSplit, strategy: str, rnd: int, labeled: np.ndarray,
            model: ActiveModel) -> dict[str, Any]:  # fmt: skip
        """A CSV row with the test metrics of ``model`` and the class counts of its labeled
        data rows (timings are added by :meth:`record`)."""
        labels = len(labeled)
        c = self.config
        scores = evaluate(model, s.test, batch_size=max(64, c.batch_size), device=self.device)
        row: dict[str, Any] = dict(
            task=self.task, strategy=strategy, seed=s.seed, round=rnd, labels=labels,
            fraction=round(labels / len(s.pool), 6), n_pool=len(s.pool), n_test=len(s.test),
            image_size=c.image_size, epochs=c.epochs, alpha=c.resolved_alpha,
        )  # fmt: skip
        row.update({m: round(float(scores[m]), 6) for m in METRIC_COLUMNS[self.task]})
        if "per_class_recall" in scores:
            recall = scores["per_class_recall"]
            row["class_recall"] = class_recall_cell(self.data.index.classes, recall)
            row["class_counts"] = class_counts_cell(
                self.data.index.classes, self.data.index.labels[labeled]
            )
        return row

    def record(self, row: dict[str, Any], began: float, train_s: float, select_s: float) -> None:
        """Add the timings, append the row to the CSV, then call the ``after_round`` hook."""
        row.update(train_seconds=round(train_s, 2), select_seconds=round(select_s, 2))
        row["wall_seconds"] = round(time.perf_counter() - began, 2)
        self.results.append(row)
        self.bar.update(1)
        if self.after_round is not None:
            self.after_round(row)

    def run_full(self, s: SeedSplit) -> None:
        """The full-data reference model of seed ``s.seed`` (round 0, fraction 1)."""
        if (self.task, FULL, s.seed, 0) in self.results.done:
            return
        began = time.perf_counter()
        self.bar.set_postfix_str(f"seed {s.seed} full")
        model, train_s = self.train(s.pool, train_seed(s.seed, FULL_ROUND), s.weights_path)
        self.record(self.row(s, FULL, 0, s.pool, model), began, train_s, 0.0)

    def pick(self, s: SeedSplit, arm: str, model: ActiveModel, labeled: np.ndarray,
             budget: int, rnd: int) -> np.ndarray:  # fmt: skip
        """Score the whole pool (not for ``random``) and select ``budget`` more images; returns
        their data rows."""
        strategy, _ = split_arm(arm)
        scores: dict[str, Any] = dict(features=None)
        if strategy in IMAGE_STRATEGIES:  # VAAL learns from the images, not the model
            scores = dict(features=None, images=s.pool_set.images)
        elif strategy != "random":
            batch = max(64, 2 * self.config.batch_size)
            out = score_pool(model, s.pool_set, batch_size=batch, device=self.device)
            scores = dict(features=out.features, predicted_loss=out.predicted_loss, probs=out.probs)
        groups = None
        if self.config.group_lesions != "off":  # one image per lesion in a batch
            groups = np.unique(self.data.index.lesion_ids[s.pool], return_inverse=True)[1]
        chosen = select(strategy, labeled=np.isin(s.pool, labeled), budget=budget,
                        alpha=self.config.resolved_alpha, seed=train_seed(s.seed, rnd),
                        device=self.device, groups=groups,
                        exclude_labeled_groups=self.config.group_lesions == "exclude-labeled",
                        **scores)  # fmt: skip
        return s.pool[chosen.indices]

    @staticmethod
    def labeled_rows(picks: dict[str, list[int]], rnd: int, size: int, where: Path) -> np.ndarray:
        """The labeled data rows of round ``rnd``: initial set and picks of rounds 1..rnd."""
        rows = np.concatenate([np.asarray(picks[str(r)], dtype=np.int64) for r in range(rnd + 1)])
        if len(rows) != size or len(np.unique(rows)) != size:
            raise RuntimeError(f"{where}: round {rnd} has {len(rows)} labels, expected {size}")
        return rows

    def initial(self, s: SeedSplit, cold_start: str | None) -> np.ndarray:
        """Round 0's labeled rows: the seed's shared random set, or a cold start's picks in the
        embedding of the warm start (or, without one, of a seeded untrained ResNet-18), as the
        server's ``cold_start`` option does."""
        if cold_start is None:
            return initial_rows(s.pool, s.sizes[0], s.seed)
        features = embed_pool(s.pool_set.images, s.weights_path, seed=s.seed, device=self.device)
        pick = typiclust if cold_start == "typiclust" else probcover
        return np.sort(s.pool[pick(features, s.sizes[0], seed=s.seed)])

    def run_strategy(self, s: SeedSplit, strategy: str) -> None:
        """All rounds of ``strategy`` for seed ``s.seed`` (resuming from the CSV and sidecar)."""
        sidecar = self.results.sidecar(self.task, strategy, s.seed)
        picks = self.results.load_picks(sidecar)
        if "0" not in picks:
            picks = {"0": self.initial(s, split_arm(strategy)[1]).tolist()}
            self.results.save_picks(sidecar, picks)
        for rnd, size in enumerate(s.sizes):
            if (self.task, strategy, s.seed, rnd) in self.results.done:
                continue
            began = time.perf_counter()
            self.bar.set_postfix_str(f"seed {s.seed} {strategy} round {rnd}")
            labeled = self.labeled_rows(picks, rnd, size, sidecar)
            model, train_s = self.train(labeled, train_seed(s.seed, rnd), s.weights_path)
            row = self.row(s, strategy, rnd, labeled, model)
            select_s = 0.0
            if rnd + 1 < len(s.sizes):
                t0 = time.perf_counter()
                new = self.pick(s, strategy, model, labeled, s.sizes[rnd + 1] - size, rnd)
                select_s = time.perf_counter() - t0
                # Picks are stored before the row: a crash in between only repeats this round.
                picks = {k: v for k, v in picks.items() if int(k) <= rnd}
                picks[str(rnd + 1)] = new.tolist()
                self.results.save_picks(sidecar, picks)
            self.record(row, began, train_s, select_s)

    def run(self) -> None:
        """Every seed: the full-data model, then each strategy's rounds."""
        c = self.config
        rounds = round_count(c.initial_fraction, c.budget_fraction, c.final_fraction)
        self.bar.reset(total=len(c.seeds) * (len(c.strategies) * rounds + int(c.full)))
        wanted = {*c.strategies, *([FULL] if c.full else [])}
        self.bar.update(sum(k[0] == self.task and k[1] in wanted and k[2] in c.seeds
                            for k in self.results.done))  # fmt: skip
        for seed in c.seeds:
            s = self.split(seed)
            if c.full:
                self.run_full(s)
            for strategy in c.strategies:
                self.run_strategy(s, strategy)
        self.bar.close()


def run_simulation(
    config: SimulationConfig, after_round: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """Run (or resume) the protocol into ``config.out``; writes the report; returns the CSV path.

    ``after_round(row)`` is called after each row is stored (tests raise in it to simulate a
    crash)."""
    known = strategy_names(images=True)
    unknown = [
        s
        for s in config.strategies
        if split_arm(s)[0] not in known or split_arm(s)[1] not in (None, *COLD_STARTS)
    ]
    if unknown:
        raise ValueError(
            f"unknown strategies {unknown}; known: {', '.join(known)}, each optionally with "
            f"@{' or @'.join(COLD_STARTS)} (a cold-start initial set)"
        )
    if config.task == "segmentation" and "entropy" in {split_arm(a)[0] for a in config.strategies}:
        raise ValueError("entropy needs class probabilities: drop it for segmentation")
    if resolve_device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    if config.deterministic:
        make_deterministic(config.threads or DEFAULT_THREADS)
    elif config.threads:
        torch.set_num_threads(config.threads)
    check_run_file(config)
    data = load_ham10000(
        config.data,
        config.task,
        config.image_size,
        config.out / "cache",
        masks_dir=config.masks,
        limit=config.limit,
        progress=config.progress,
    )
    check_run_file(config, write=True)
    results = Results(config.out)
    Simulation(config, data, results, after_round).run()
    build_report(results.csv, config.out)
    return results.csv


def build_parser() -> argparse.ArgumentParser:
    """The ``coreloop simulate`` arguments (a ``--preset`` only changes their defaults)."""
    p = argparse.ArgumentParser(prog="coreloop simulate", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a documented benchmark")
    p.add_argument("--data", type=Path, help="HAM10000 layout: HAM10000_metadata.csv + images")
    p.add_argument("--masks", type=Path, help="folder of <image_id>_segmentation.png")
    p.add_argument("--out", type=Path, help="results folder (default artifacts/simulate-<task>)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification")
    p.add_argument("--strategies", default="random,confident_coreset",
                   help=f"comma list of: {', '.join(strategy_names(images=True))}; "
        "STRATEGY@typiclust or @probcover picks its initial set by that cold start")  # fmt: skip
    p.add_argument("--seeds", default="0", help="comma list of run seeds, e.g. 0,1,2")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--alpha", type=float, help="eq. 5 weight (default 0.25 cls, 0.5 seg)")
    p.add_argument("--initial-fraction", type=float, default=0.10)
    p.add_argument("--budget-fraction", type=float, default=0.05, help="per round, of the pool")
    p.add_argument("--final-fraction", type=float, default=0.40)
    p.add_argument("--test-fraction", type=float, default=0.20)
    p.add_argument("--limit", type=int, help="use only N images (whole lesions), for smoke runs")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for training")
    p.add_argument(
        "--augment",
        choices=POLICIES,
        default="derm",
        help="training augmentation: derm (default), flip (the paper's), none",
    )
    p.add_argument(
        "--class-balance",
        choices=CLASS_BALANCES,
        default="sampler",
        help="imbalance handling: sampler (default), loss (class-weighted), none",
    )
    p.add_argument("--seg-loss", choices=("dice_bce", "dice"), default="dice_bce")
    p.add_argument(
        "--group-lesions",
        choices=("off", "batch", "exclude-labeled"),
        default="off",
        help="batch: no batch holds two images of one lesion; exclude-labeled: nor an image "
        "of a lesion already labeled",
    )
    p.add_argument(
        "--warm-start-epochs",
        type=int,
        default=0,
        help="SimCLR epochs on each seed's pool before its rounds (0: none; ml.pretrain)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="repeatable CPU runs: fixed threads, AVX2 kernels (docs/benchmarks.md)",
    )
    p.add_argument(
        "--threads", type=int, help=f"torch threads (--deterministic: {DEFAULT_THREADS})"
    )
    p.add_argument("--no-full", action="store_true", help="skip the full-data reference model")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--via-api",
        metavar="URL",
        help="drive a running coreloop server over HTTP (coreloop simulate only)",
    )
    p.add_argument("--token", help="--via-api: an admin token (default: $CORELOOP_TOKEN)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--preset`` its values become defaults that explicit flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def config_from_args(args: argparse.Namespace) -> SimulationConfig:
    """A :class:`SimulationConfig` from parsed arguments."""
    return SimulationConfig(
        data=args.data, out=args.out or Path("artifacts") / f"simulate-{args.task}",
        task=args.task, masks=args.masks,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
        device=args.device, alpha=args.alpha, initial_fraction=args.initial_fraction,
        budget_fraction=args.budget_fraction, final_fraction=args.final_fraction,
        test_fraction=args.test_fraction, limit=args.limit, full=not args.no_full,
        num_workers=args.num_workers, progress=not args.no_progress, augment=args.augment,
        class_balance=args.class_balance, seg_loss=args.seg_loss,
        deterministic=args.deterministic, threads=args.threads, group_lesions=args.group_lesions,
        warm_start_epochs=args.warm_start_epochs,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``coreloop simulate ...``: 0 on success, 2 on a usage or settings error."""
    args = parse_args(argv)
    if args.via_api:
        # ml/ imports nothing from app/: the HTTP client lives in coreloop.via_api.
        print("simulate: --via-api is run by `coreloop simulate --via-api URL ...` "
              "(coreloop.via_api), not by python -m ml.simulate", file=sys.stderr)  # fmt: skip
        return 2
    if args.data is None:
        print("simulate: --data DIR is required", file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
        began = time.perf_counter()
        csv_path = run_simulation(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"simulate: {error}", file=sys.stderr)
        return 2
    print(f"{csv_path} ({time.perf_counter() - began:.0f} s); report in {config.out}/report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
