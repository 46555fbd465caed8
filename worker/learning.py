"""A learning round's work, phase by phase: train on the snapshot's labels, evaluate on the
test split, save the model version, score the whole pool, select the next batch, write the
pre-annotations. Returns a :class:`worker.records.RoundResult` for the final transaction.

Shapes: the pool is decoded once, uint8 ``[N, s, s, 3]`` in image-id order; ``labeled`` are
indices into it. Selection sees the features of the whole pool (k-center needs the labeled
ones); queue items and predictions are for unlabeled images only.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image as PILImage

from app.models import RoundStatus
from ml.checkpoint import save_checkpoint
from ml.data import ImageDataset, Task
from ml.infer import PoolOutput, score_pool
from ml.selection import select
from ml.train import TrainConfig, TrainResult, evaluate, recipe, train_model
from worker import inputs, records
from worker.heartbeat import Heartbeat
from worker.inputs import RoundEnv, RoundRows
from worker.pretrain import warm_start_weights
from worker.records import Claim, PredictionEntry, QueueEntry, RoundResult

log = logging.getLogger(__name__)

RESUME_EVERY_SECONDS = 60.0
PROGRESS_EVERY_SECONDS = 1.0
_SLIM_KEYS = ("format", "task", "num_classes", "model", "epoch", "config", "history")


class ProgressWriter:
    """Writes a run's progress JSON, at most once a second unless the phase changes."""

    def __init__(self, env: RoundEnv, claim: Claim) -> None:
        self.env, self.claim = env, claim
        self.status: str | None = None
        self.last = 0.0

    def __call__(self, status: RoundStatus, force: bool = False, **progress: Any) -> None:
        now = time.monotonic()
        changed = status.value != self.status
        if not (force or changed or now - self.last >= PROGRESS_EVERY_SECONDS):
            return
        records.set_progress(
            self.env.sessions, self.claim, {"phase": status.value, **progress}, status.value
        )
        self.status, self.last = status.value, now


def checkpoint_key(claim: Claim) -> str:
    """The model version's checkpoint: one per round, overwritten by a re-run."""
    return f"models/{claim.project_id}/round-{claim.number}.pt"


def resume_key(claim: Claim) -> str:
    """The resumable training state a crashed attempt leaves for the next one."""
    return f"models/{claim.project_id}/round-{claim.number}.resume.pt"


def train_config(env: RoundEnv, claim: Claim, project: inputs.ProjectConfig) -> TrainConfig:
    config = TrainConfig(
        epochs=project.epochs,
        batch_size=project.batch_size,
        image_size=project.image_size,
        seed=claim.round_id,
        device=env.settings.device,
    )
    if project.learning_rate is not None:
        config.lr = project.learning_rate
    # The project's finished warm start, if any: every round then trains from its backbone.
    config.weights_path = warm_start_weights(env, claim.project_id)
    return config


def train(
    env: RoundEnv,
    claim: Claim,
    heartbeat: Heartbeat,
    progress: ProgressWriter,
    rows: RoundRows,
    labeled: Sequence[int],
    train_set: ImageDataset,
) -> TrainResult:
    """Train with progress per epoch, cancel checks per batch, and a resumable checkpoint."""
    project = rows.project
    config = train_config(env, claim, project)
    fingerprint = {
        "round_id": claim.round_id,
        "label_snapshot_id": claim.label_snapshot_id,
        "config": {k: v for k, v in asdict(config).items() if k != "device"},
        **inputs.dataset_fingerprint(rows, labeled),
    }
    key = resume_key(claim)
    last_saved = -math.inf

    def save_resumable(state: dict[str, Any]) -> None:
        nonlocal last_saved
        if state["epoch"] >= config.epochs or time.monotonic() - last_saved < RESUME_EVERY_SECONDS:
            return
        save_checkpoint(env.storage.path(key), {**state, "coreloop_resume": fingerprint})
        last_saved = time.monotonic()

    def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        progress(
            RoundStatus.training,
            force=True,
            step="training",
            epoch=epoch,
            epochs=epochs,
            loss=metrics.get("loss"),
            train_size=len(train_set),
        )

    progress(RoundStatus.training, step="training", epoch=0, epochs=config.epochs)
    return train_model(
        _task(project),
        inputs.num_outputs(project),
        train_set,
        config,
        on_epoch=on_epoch,
        should_stop=heartbeat.should_stop,
        resume=inputs.resume_state(env, key, fingerprint),
        checkpoint_every=save_resumable,
    )


def _task(project: inputs.ProjectConfig) -> Task:
    if project.task not in ("classification", "segmentation"):
        raise inputs.RoundConfigError(f"Unknown task {project.task!r} of project {project.id}.")
    return "classification" if project.task == "classification" else "segmentation"


def save_model(
    env: RoundEnv,
    claim: Claim,
    rows: RoundRows,
    trained: TrainResult,
    metrics: dict[str, Any],
) -> int:
    """Write the checkpoint (temp-then-rename), then insert/replace the model version row."""
    state = {k: trained.checkpoint[k] for k in _SLIM_KEYS if k in trained.checkpoint}
    state["coreloop"] = {
        "project_id": claim.project_id,
        "round_id": claim.round_id,
        "round_number": claim.number,
        "classes": rows.project.classes,
        "image_size": rows.project.image_size,
        "label_snapshot_id": claim.label_snapshot_id,
    }
    key = checkpoint_key(claim)
    sha256 = save_checkpoint(env.storage.path(key), state)
    return records.save_model_version(env.sessions, claim, key, sha256, metrics)


def score(
    env: RoundEnv,
    heartbeat: Heartbeat,
    progress: ProgressWriter,
    trained: TrainResult,
    pixels: np.ndarray,
    batch_size: int,
) -> PoolOutput:
    """One pass over the whole pool: features, predicted loss, softmax or mask."""

    def on_progress(done: int, total: int) -> None:
        progress(RoundStatus.scoring, force=done == total, step="pool", scored=done, total=total)

    return score_pool(
        trained.model,
        ImageDataset(pixels),
        batch_size=max(batch_size, 64),
        device=env.device,
        on_progress=on_progress,
        should_stop=heartbeat.should_stop,
    )


def choose(
    env: RoundEnv, claim: Claim, rows: RoundRows, out: PoolOutput, labeled: Sequence[int]
) -> list[QueueEntry]:
    """Select up to B unlabeled pool images not already waiting in an open queue item; with the
    project's ``group_key``, one image per group at most (and, with ``exclude_labeled_groups``,
    none of a group with a labeled or queued image), so fewer than B when the groups run out."""
    covered = inputs.read_covered_images(env.sessions, claim.project_id)
    mask = np.array([row.id in covered for row in rows.pool], dtype=bool)
    mask[list(labeled)] = True
    budget = min(claim.budget, int((~mask).sum()))
    if budget <= 0:
        return []
    picked = select(
        claim.strategy,
        features=out.features,
        labeled=mask,
        budget=budget,
        alpha=claim.alpha,
        predicted_loss=out.predicted_loss,
        probs=out.probs,
        seed=claim.round_id,
        device=env.device,
        groups=rows.groups,
        exclude_labeled_groups=rows.project.exclude_labeled_groups,
    )
    return [
        QueueEntry(
            image_id=rows.pool[int(i)].id,
            min_distance=_scalar(picked.min_distance, k),
            predicted_loss=_scalar(picked.predicted_loss, k),
            score=_scalar(picked.combined, k),
        )
        for k, i in enumerate(picked.indices)
    ]


def _scalar(values: Any, k: int) -> float | None:
    if values is None:
        return None
    value = float(values[k])
    return value if math.isfinite(value) else None


def predictions(
    env: RoundEnv, rows: RoundRows, out: PoolOutput, model_version_id: int
) -> list[PredictionEntry]:
    """Pre-annotations for the unlabeled pool: class probabilities, or a mask PNG (0/255, at
    the image's own size) written under ``predictions/<model_version>/<image>.png``."""
    unlabeled = [i for i, row in enumerate(rows.pool) if row.id not in rows.labels]
    mask_keys: dict[int, str] = {}
    if out.masks is not None:
        mask_keys = _write_masks(env, rows, out.masks, unlabeled, model_version_id)
    return [
        PredictionEntry(
            image_id=rows.pool[i].id,
            class_probs=None if out.probs is None else [round(float(p), 6) for p in out.probs[i]],
            mask_key=mask_keys.get(i),
            predicted_loss=float(out.predicted_loss[i]),
        )
        for i in unlabeled
    ]


def _write_masks(
    env: RoundEnv, rows: RoundRows, masks: np.ndarray, indices: Sequence[int], version_id: int
) -> dict[int, str]:
    """Write the masks of ``indices`` as PNGs on a few threads (encoding and fsync release the
    GIL; one file at a time spends most of its time waiting for the disk)."""

    def write(i: int) -> tuple[int, str]:
        row = rows.pool[i]
        key = f"predictions/{version_id}/{row.id}.png"
        env.storage.put_bytes(key, _mask_png(masks[i], row.width, row.height))
        return i, key

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(write, indices))


def _mask_png(mask: np.ndarray, width: int, height: int) -> bytes:
    image = PILImage.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    image = image.resize((width, height), PILImage.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class Stopwatch:
    """Seconds spent per phase, for the round's metrics (and the cost benchmark)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - began


def learning_round(
    env: RoundEnv, claim: Claim, heartbeat: Heartbeat, rows: RoundRows, labeled: Sequence[int]
) -> RoundResult:
    """Train on ``labeled`` (indices into ``rows.pool``), then score, select and predict."""
    project, progress, watch = rows.project, ProgressWriter(env, claim), Stopwatch()
    with watch.phase("load"):
        pixels, train_set, test_set = _load(env, rows, labeled, progress)
    heartbeat.check()
    with watch.phase("train"):
        trained = train(env, claim, heartbeat, progress, rows, labeled, train_set)
    heartbeat.check()
    with watch.phase("test"):
        progress(RoundStatus.scoring, step="test", n=0 if test_set is None else len(test_set))
        test = None if test_set is None else evaluate(trained.model, test_set, device=env.device)
    metrics: dict[str, Any] = {"history": trained.history, "test": test, "device": env.device}
    metrics["recipe"] = recipe(_task(project), TrainConfig(**trained.checkpoint["config"]))
    metrics.update(train_size=len(train_set), labeled_count=len(labeled))
    metrics["warnings"] = inputs.label_warnings(project, train_set)
    with watch.phase("checkpoint"):
        version_id = save_model(env, claim, rows, trained, metrics)
    with watch.phase("score"):
        out = score(env, heartbeat, progress, trained, pixels, project.batch_size)
    heartbeat.check()
    progress(RoundStatus.selecting, budget=claim.budget)
    with watch.phase("select"):
        queue = choose(env, claim, rows, out, labeled)
    heartbeat.check()
    with watch.phase("predictions"):
        preds = predictions(env, rows, out, version_id)
    with watch.phase("stopping"):  # agreement with the previous round (ml.stopping)
        metrics["stopping"] = inputs.stopping_signal(env.sessions, env.storage, claim, rows, out)
    metrics.update(pool_size=len(rows.pool), selected=len(queue), seconds=watch.seconds)
    return RoundResult(queue, preds, metrics, version_id, {"selected": len(queue)})


def _load(
    env: RoundEnv, rows: RoundRows, labeled: Sequence[int], progress: ProgressWriter
) -> tuple[np.ndarray, ImageDataset, ImageDataset | None]:
    """Decode the pool once; the training set is its labeled rows; plus the test set."""

    def on_progress(done: int, total: int) -> None:
        progress(RoundStatus.training, step="loading", loaded=done, total=total)

    pixels = inputs.load_pixels(env.storage, rows.pool, rows.project.image_size, on_progress)
    labels = [rows.labels[rows.pool[i].id] for i in labeled]
    train_set = inputs.labeled_dataset(env.storage, rows.project, pixels[list(labeled)], labels)
    return pixels, train_set, _test_set(env, rows)


def _test_set(env: RoundEnv, rows: RoundRows) -> ImageDataset | None:
    """The labeled test images, or None when the test split has no labels."""
    tested = [row for row in rows.test if row.id in rows.labels]
    if not tested:
        return None
    pixels = inputs.load_pixels(env.storage, tested, rows.project.image_size)
    labels = [rows.labels[row.id] for row in tested]
    return inputs.labeled_dataset(env.storage, rows.project, pixels, labels)
