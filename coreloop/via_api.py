"""``coreloop simulate --via-api URL``: the simulate protocol, driven through a running server.

The oracle of ``coreloop simulate`` labels real images, but over HTTP, as an annotation team
would: it creates one project per (strategy, seed), uploads the seed's lesion-grouped pool and
its labeled test split, then repeats "trigger a round (``POST /rounds``), wait for the worker,
label what ``GET /queue`` offers (``POST /labels``)" until the labeled fraction reaches
``--final-fraction``. Each finished round becomes a row of the same ``results.csv`` as a direct
simulation (so ``coreloop report`` reads it), with the metrics the worker measured on the test
split and the time the round took; ``via-api.json`` keeps each round's server-side phase timings
and the oracle's labeling time.

A rerun with the same ``--out`` and server reuses the projects (found by name); the re-sent
images are stored once (the server reports them as duplicates); rounds already in the CSV are
skipped, and it goes on from the server's state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from coreloop.demo import (
    DemoData,
    find_or_create_project,
    oracle_label_batch,
    post_oracle_label,
    run_round,
    upload_images,
)
from coreloop.demo import _ok as ok

PREFIX = "[coreloop simulate --via-api]"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", flush=True)


def seed_data(index: Any, task: str, seed: int, test_fraction: float) -> DemoData:
    """The seed's split of ``index`` (a :class:`ml.ham10000.HamIndex`), as upload + oracle data:
    the same lesion-grouped, class-stratified split as ``coreloop simulate``."""
    from ml.ham10000 import lesion_split

    pool, test = lesion_split(index.lesion_ids, test_fraction, seed, index.labels)
    truth = {index.image_paths[i].name: index.classes[index.labels[i]] for i in range(len(index))}
    masks = {}
    if task == "segmentation":
        masks = {index.image_paths[i].name: index.mask_paths[i] for i in range(len(index))}
    return DemoData(
        source=str(index.root),
        classes=list(index.classes),
        pool=[index.image_paths[i] for i in pool],
        test=[index.image_paths[i] for i in test],
        truth=truth,
        masks=masks,
    )


def project_name(config: Any, strategy: str, seed: int) -> str:
    """Stable per (out folder, fixed settings, strategy, seed), so a rerun finds its project."""
    settings = json.dumps(config.fixed_settings(), sort_keys=True)
    tag = hashlib.sha256(f"{Path(config.out).resolve()}|{settings}".encode()).hexdigest()[:8]
    return f"simulate-{config.task}-{strategy}-seed{seed}-{tag}"


def ensure_project(
    client: httpx.Client, config: Any, strategy: str, seed: int, data: DemoData
) -> dict[str, Any]:
    body = {
        "name": project_name(config, strategy, seed),
        "task": config.task,
        "classes": data.classes if config.task == "classification" else ["lesion"],
        # A count, as in the direct simulation: round(budget_fraction * pool) per round.
        "budget": max(1, round(config.budget_fraction * len(data.pool))),
        "initial_fraction": config.initial_fraction,
        "strategy": strategy,
        "alpha": config.resolved_alpha,
        "image_size": config.image_size,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
    }
    return find_or_create_project(client, body, say=say)


def _seconds(start: str | None, end: str | None) -> float:
    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def round_row(
    config: Any,
    strategy: str,
    seed: int,
    n_pool: int,
    n_test: int,
    finished: dict[str, Any],
    classes: Sequence[str],
) -> dict[str, Any]:
    """The ``results.csv`` row of a finished server round ``k`` (>= 1): simulate's round k-1.
    ``classes``: the project's classes, in the order of the worker's ``per_class_recall``."""
    from ml.simulate import METRIC_COLUMNS, class_recall_cell

    test = finished.get("test_metrics") or {}
    phases = (finished.get("metrics") or {}).get("seconds") or {}
    labels = int(finished["labeled_count"] or 0)
    row: dict[str, Any] = dict(
        task=config.task, strategy=strategy, seed=seed, round=finished["number"] - 1,
        labels=labels, fraction=round(labels / n_pool, 6), n_pool=n_pool, n_test=n_test,
        image_size=config.image_size, epochs=config.epochs, alpha=config.resolved_alpha,
        train_seconds=round(float(phases.get("train", 0.0)), 2),
        select_seconds=round(float(phases.get("score", 0.0) + phases.get("select", 0.0)), 2),
        wall_seconds=round(_seconds(finished.get("created_at"), finished.get("finished_at")), 2),
    )  # fmt: skip
    for metric in METRIC_COLUMNS[config.task]:
        if isinstance(test.get(metric), int | float):
            row[metric] = round(float(test[metric]), 6)
    recall = test.get("per_class_recall")
    if config.task == "classification" and isinstance(recall, list) and len(recall) == len(classes):
        row["class_recall"] = class_recall_cell(classes, recall)
    return row


class Journal:
    """``via-api.json``: per (strategy, seed, round), the server's timings and the oracle's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )

    def add(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = {**self.entries.get(key, {}), **entry}
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.entries, indent=1) + "\n")
        os.replace(tmp, self.path)


def run_strategy(
    client: httpx.Client,
    config: Any,
    strategy: str,
    seed: int,
    data: DemoData,
    results: Any,
    journal: Journal,
) -> None:
    """One project: round 0 (the initial random set), then label + round until the schedule's
    last training; rows for rounds the CSV lacks are appended as they finish."""
    from ml.simulate import round_count

    project = ensure_project(client, config, strategy, seed, data)
    names = upload_images(client, project, data)
    if config.task == "segmentation":  # the test split's masks, so the worker can score rounds
        test_names = {f.name for f in data.test}
        for image_id, name in names.items():
            if name in test_names:
                post_oracle_label(client, project, data, image_id, name, f"via-api-test:{image_id}")
    trainings = round_count(config.initial_fraction, config.budget_fraction, config.final_fraction)
    n_pool, n_test = len(data.pool), len(data.test)

    def finished_rounds() -> list[dict[str, Any]]:
        rounds = ok(client.get("/rounds", params={"project_id": project["id"]}))
        return sorted((r for r in rounds if r["status"] == "done"), key=lambda r: r["number"])

    def record(finished: dict[str, Any], label_seconds: float | None) -> None:
        if (config.task, strategy, seed, finished["number"] - 1) in results.done:
            return  # journal first, then the row: a stored row means both are there
        row = round_row(config, strategy, seed, n_pool, n_test, finished, data.classes)
        entry = {"project_id": project["id"], "round_id": finished["id"], **row,
                 "phases": (finished.get("metrics") or {}).get("seconds") or {}}  # fmt: skip
        if label_seconds is not None:
            entry["label_seconds"] = round(label_seconds, 2)
        journal.add(f"{strategy}/seed{seed}/round{finished['number']}", entry)
        results.append(row)
        shown = ", ".join(
            f"{m} {row[m]:.3f}" for m in ("accuracy", "balanced_accuracy", "jaccard") if m in row
        )
        say(
            f"{strategy} seed {seed} round {row['round']}: {row['labels']} labels, {shown}, "
            f"round {row['wall_seconds']:.0f} s, train {row['train_seconds']:.0f} s"
        )

    done = finished_rounds()
    for finished in done:
        if finished["number"] >= 1:
            record(finished, None)
    if not done:
        first = run_round(client, project["id"], say=say)
        _check(first)
        done = [first]
    while max(r["number"] for r in done) < trainings:
        began = time.perf_counter()
        labeled = oracle_label_batch(client, project, data, names)
        label_seconds = time.perf_counter() - began
        say(f"oracle labeled {labeled} images in {label_seconds:.1f} s")
        finished = run_round(client, project["id"], say=say)
        _check(finished)
        record(finished, label_seconds)
        done.append(finished)


def _check(finished: dict[str, Any]) -> None:
    if finished["status"] != "done":
        raise RuntimeError(
            f"round {finished['number']} ended {finished['status']}: {finished.get('error')}"
        )


def run(args: argparse.Namespace) -> int:
    """Run the protocol against ``args.via_api``; 0 on success, 2 on a usage error."""
    from ml.ham10000 import task_index
    from ml.report import build_report
    from ml.simulate import Results, check_run_file, config_from_args

    token = args.token or os.environ.get("CORELOOP_TOKEN")
    if not token:
        say("a token is needed: --token T or CORELOOP_TOKEN (coreloop users create --role admin)")
        return 2
    if args.data is None:
        say("--data DIR is required")
        return 2
    if args.out is None:
        args.out = Path("artifacts") / f"simulate-{args.task}-api"
    config = config_from_args(args)
    try:
        index = task_index(config.data, config.task, masks_dir=config.masks, limit=config.limit)
        check_run_file(config, write=True)
    except (ValueError, FileNotFoundError) as error:
        say(str(error))
        return 2
    results = Results(config.out)
    journal = Journal(config.out / "via-api.json")
    headers = {"Authorization": f"Bearer {token}"}
    began = time.perf_counter()
    with httpx.Client(base_url=args.via_api.rstrip("/"), headers=headers, timeout=120.0) as client:
        try:
            ok(client.get("/ready"))
        except (httpx.HTTPError, RuntimeError) as error:
            say(f"the server at {args.via_api} is not ready: {error}")
            return 2
        for seed in config.seeds:
            data = seed_data(index, config.task, seed, config.test_fraction)
            for strategy in config.strategies:
                run_strategy(client, config, strategy, seed, data, results, journal)
    build_report(results.csv, config.out)
    say(f"{results.csv} ({time.perf_counter() - began:.0f} s); report in {config.out}/report.md")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ml.simulate import parse_args

    raise SystemExit(run(parse_args(sys.argv[1:])))
