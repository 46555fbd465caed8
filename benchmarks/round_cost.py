"""What one active-learning round costs: the real round runner, in-process, on HAM10000.

    python -m benchmarks.round_cost --data ../shared/data/ham10000 [--pool 7000]
        [--labeled 700] [--budget 350] [--image-size 64] [--epochs 10] [--threads 2]

Builds a throw-away SQLite deployment in a temporary folder (``--workdir``), registers a
lesion-grouped HAM10000 pool of ``--pool`` images and its test split, labels ``--labeled`` pool
images (a random 10%, as after round 0), then runs the round exactly as the worker does
(``worker.rounds.run_round``: claim, decode, train, test, checkpoint, score the whole pool,
select B with confident coreset, predictions, one final transaction) and prints the time of
every phase. The images are read in place through a read-only overlay of the storage: nothing
is copied, and nothing is written next to the data.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import func, select

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.migrate import upgrade
from app.models import Image, Label, Project, QueueItem, Round, RoundStatus
from app.settings import Settings
from app.storage import Storage
from ml.ham10000 import lesion_split, read_ham10000
from worker.inputs import RoundEnv
from worker.rounds import run_round

DATA_PREFIX = "ham10000/"


class OverlayStorage(Storage):
    """Storage whose ``ham10000/...`` keys are the data set's own files (read in place)."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        super().__init__(root)
        self.data_dir = data_dir.resolve()

    def path(self, key: str) -> Path:
        if key.startswith(DATA_PREFIX):
            Storage.path(self, key)  # the same key validation
            return self.data_dir / key.removeprefix(DATA_PREFIX)
        return super().path(key)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--pool", type=int, default=7000)
    parser.add_argument("--labeled", type=int, default=700)
    parser.add_argument("--budget", type=int, default=350)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--task", default="classification", choices=["classification", "segmentation"]
    )
    parser.add_argument("--strategy", default="confident_coreset")
    parser.add_argument("--alpha", type=float, default=None, help="default: 0.25 / 0.5 by task")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def register(settings: Settings, args: argparse.Namespace) -> tuple[int, int]:
    """Insert the project, its pool + test images and the labels; returns (project, round)."""
    index = read_ham10000(args.data)
    segmentation = args.task == "segmentation"
    pool_rows, test_rows = lesion_split(
        index.lesion_ids, args.test_fraction, args.seed, index.labels
    )
    pool_rows = pool_rows[: args.pool]
    rng = np.random.default_rng(args.seed)
    labeled = set(rng.choice(len(pool_rows), size=args.labeled, replace=False).tolist())
    engine = make_engine(settings)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    with unit_of_work(sessions) as session:
        project = Project(
            name="round-cost",
            task=args.task,
            classes=["lesion"] if segmentation else list(index.classes),
            budget_count=args.budget,
            initial_fraction=0.1,
            strategy=args.strategy,
            alpha=args.alpha,
            overlap=1,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
        )
        session.add(project)
        session.flush()
        for split, rows in (("pool", pool_rows), ("test", test_rows)):
            for k, row in enumerate(rows.tolist()):
                image = _image_row(project.id, index.image_paths[row], split)
                session.add(image)
                session.flush()
                if split == "test" or k in labeled:
                    mask = index.mask_paths[row] if segmentation else None
                    session.add(_label(project.id, image.id, int(index.labels[row]), mask))
        session.add(
            Round(
                project_id=project.id,
                number=1,
                status=RoundStatus.queued.value,
                strategy=args.strategy,
                alpha=args.alpha,
                budget=args.budget,
                progress={},
                metrics={},
                attempt=0,
            )
        )
        session.flush()
        round_id = session.scalar(select(Round.id).where(Round.project_id == project.id))
        assert round_id is not None
        result = project.id, round_id
    engine.dispose()
    return result


def _image_row(project_id: int, path: Path, split: str) -> Image:
    return Image(
        project_id=project_id,
        sha256=uuid.uuid4().hex,
        storage_key=f"{DATA_PREFIX}images/{path.name}",
        filename=path.name,
        content_type="image/jpeg",
        width=200,
        height=150,
        split=split,
        meta={},
    )


def _label(project_id: int, image_id: int, class_index: int, mask: Path | None) -> Label:
    """A class label, or (segmentation) the data set's own mask file read in place."""
    return Label(
        project_id=project_id,
        image_id=image_id,
        source="import",
        class_index=None if mask else class_index,
        mask_key=f"{DATA_PREFIX}masks/{mask.name}" if mask else None,
        idempotency_key=uuid.uuid4().hex,
    )


def main() -> None:
    args = parse_args()
    if args.alpha is None:
        args.alpha = 0.5 if args.task == "segmentation" else 0.25
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="coreloop-round-cost-"))
    settings = Settings(environment="test", data_dir=workdir, device=args.device)
    began = time.perf_counter()
    project_id, round_id = register(settings, args)
    setup = time.perf_counter() - began
    engine = make_engine(settings)
    sessions = make_sessionmaker(engine)
    env = RoundEnv(settings, sessions, OverlayStorage(settings.files_dir, args.data))
    began = time.perf_counter()
    outcome = run_round(round_id, settings, env)
    wall = time.perf_counter() - began
    with unit_of_work(sessions) as session:
        row = session.get(Round, round_id)
        assert row is not None
        queued = session.scalar(select(func.count()).where(QueueItem.round_id == round_id))
        metrics: dict[str, Any] = dict(row.metrics)
    seconds = metrics.get("seconds", {})
    report = {
        "outcome": outcome,
        "error": row.error,
        "pool": metrics.get("pool_size"),
        "labeled": metrics.get("train_size"),
        "selected": queued,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "device": metrics.get("device"),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "seconds_per_epoch": [round(h["seconds"], 2) for h in metrics.get("history", [])],
        "finalize_and_overhead": round(wall - sum(seconds.values()), 2),
        "round_wall": round(wall, 2),
        "setup_not_counted": round(setup, 2),
        "test": {k: v for k, v in (metrics.get("test") or {}).items() if not isinstance(v, list)},
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "project_id": project_id,
        "workdir": str(workdir),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
