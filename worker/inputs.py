"""What a round reads: the project's settings, its images and their labels at the snapshot,
then the pixels, decoded once into memory at the model's resolution.

The database reads are short read transactions that return plain values; file decoding runs
with no transaction open, on a few threads (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.models import Image, Label, Project, QueueItem, Split
from app.settings import Settings
from app.storage import Storage
from ml.data import ImageDataset, load_image, load_mask
from ml.train import resolve_device
from worker.records import Claim

Progress = Callable[[int, int], None]


class RoundConfigError(Exception):
    """The project's settings or data cannot make a round; the text is shown to the user."""


@dataclass
class RoundEnv:
    """What a run needs besides its claim: settings, database sessions, file storage."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage

    @classmethod
    def from_settings(cls, settings: Settings) -> RoundEnv:
        sessions = make_sessionmaker(make_engine(settings))
        return cls(settings, sessions, Storage(settings.files_dir))

    def close(self) -> None:
        """Dispose of the engine behind ``sessions``."""
        bind = self.sessions.kw.get("bind")
        if isinstance(bind, Engine):
            bind.dispose()

    @property
    def device(self) -> str:
        """``settings.device`` resolved: ``auto`` is CUDA when available, else the CPU."""
        return str(resolve_device(self.settings.device))


@dataclass(frozen=True)
class ProjectConfig:
    id: int
    task: str
    classes: list[str]
    image_size: int
    epochs: int
    batch_size: int
    learning_rate: float | None
    initial_fraction: float


@dataclass(frozen=True)
class ImageRow:
    id: int
    storage_key: str
    width: int
    height: int


@dataclass(frozen=True)
class LabelRow:
    image_id: int
    class_index: int | None
    mask_key: str | None


@dataclass
class RoundRows:
    """The round's inputs as plain values: pool and test images ordered by id, and the current
    label (newest with id <= snapshot) of every labeled one."""

    project: ProjectConfig
    pool: list[ImageRow]
    test: list[ImageRow]
    labels: dict[int, LabelRow]

    def labeled_pool(self) -> list[int]:
        """Indices into ``pool`` of the images the snapshot labels."""
        return [i for i, row in enumerate(self.pool) if row.id in self.labels]


def _images(session: Session, project_id: int, split: Split) -> list[ImageRow]:
    rows = session.execute(
        select(Image.id, Image.storage_key, Image.width, Image.height)
        .where(Image.project_id == project_id, Image.split == split.value)
        .order_by(Image.id)
    )
    return [ImageRow(r.id, r.storage_key, r.width, r.height) for r in rows]


def _current_labels(session: Session, project_id: int, snapshot: int) -> dict[int, LabelRow]:
    """The newest usable label (a class or a mask) per image among ids <= ``snapshot``."""
    newest = (
        select(func.max(Label.id))
        .where(
            Label.project_id == project_id,
            Label.id <= snapshot,
            Label.class_index.is_not(None) | Label.mask_key.is_not(None),
        )
        .group_by(Label.image_id)
    )
    rows = session.execute(
        select(Label.image_id, Label.class_index, Label.mask_key).where(Label.id.in_(newest))
    )
    return {r.image_id: LabelRow(r.image_id, r.class_index, r.mask_key) for r in rows}


def read_round_rows(sessions: sessionmaker[Session], claim: Claim) -> RoundRows:
    """One short read of everything the round trains and scores on."""
    with unit_of_work(sessions) as session:
        p = session.execute(select(Project).where(Project.id == claim.project_id)).scalar_one()
        project = ProjectConfig(
            id=p.id,
            task=p.task,
            classes=[str(c) for c in p.classes],
            image_size=p.image_size,
            epochs=p.epochs,
            batch_size=p.batch_size,
            learning_rate=p.learning_rate,
            initial_fraction=p.initial_fraction,
        )
        pool = _images(session, p.id, Split.pool)
        test = _images(session, p.id, Split.test)
        labels = _current_labels(session, p.id, claim.label_snapshot_id)
    return RoundRows(project, pool, test, labels)


def read_covered_images(sessions: sessionmaker[Session], project_id: int) -> set[int]:
    """Image ids selection must not pick: labeled by now (at any id), or waiting in an open
    queue item (``labels_needed > 0``) of an earlier round."""
    with unit_of_work(sessions) as session:
        labeled = session.scalars(select(Label.image_id).where(Label.project_id == project_id))
        queued = session.scalars(
            select(QueueItem.image_id).where(
                QueueItem.project_id == project_id, QueueItem.labels_needed > 0
            )
        )
        return {*labeled, *queued}


def _read_pixels(storage: Storage, row: ImageRow, size: int) -> np.ndarray:
    try:
        return load_image(storage.path(row.storage_key), size)
    except (OSError, ValueError) as exc:
        raise RoundConfigError(
            f"Cannot read image {row.id} ({row.storage_key}): {exc}. Re-upload or delete it."
        ) from exc


def load_pixels(
    storage: Storage, rows: Sequence[ImageRow], size: int, on_progress: Progress | None = None
) -> np.ndarray:
    """Decode ``rows`` at ``size x size``; uint8 ``[N, size, size, 3]`` in the order given.

    ``on_progress(done, total)`` is called about once a second and at the end.
    """
    out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    workers = max(1, min(8, os.cpu_count() or 1))
    last = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, pixels in enumerate(pool.map(lambda r: _read_pixels(storage, r, size), rows)):
            out[i] = pixels
            if on_progress is not None and time.monotonic() - last >= 1.0:
                on_progress(i + 1, len(rows))
                last = time.monotonic()
    if on_progress is not None:
        on_progress(len(rows), len(rows))
    return out


def _targets(project: ProjectConfig, labels: Sequence[LabelRow]) -> np.ndarray:
    classes = np.array([-1 if lab.class_index is None else lab.class_index for lab in labels])
    bad = [
        lab.image_id
        for lab, c in zip(labels, classes, strict=True)
        if not 0 <= c < len(project.classes)
    ]
    if bad:
        raise RoundConfigError(
            f"{len(bad)} labels have no class index in 0..{len(project.classes) - 1} "
            f"(images {bad[:5]}); label them again with a class of this project."
        )
    return classes.astype(np.int64)


def _masks(storage: Storage, labels: Sequence[LabelRow], size: int) -> np.ndarray:
    out = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, lab in enumerate(labels):
        if lab.mask_key is None:
            raise RoundConfigError(
                f"Image {lab.image_id} is labeled with a class, not a mask; this is a "
                "segmentation project: label it again with a mask."
            )
        try:
            out[i] = load_mask(storage.path(lab.mask_key), size)
        except (OSError, ValueError) as exc:
            raise RoundConfigError(f"Cannot read mask {lab.mask_key}: {exc}") from exc
    return out


def labeled_dataset(
    storage: Storage, project: ProjectConfig, images: np.ndarray, labels: Sequence[LabelRow]
) -> ImageDataset:
    """``images[i]`` labeled by ``labels[i]``: class targets or masks, by the project's task."""
    if project.task == "classification":
        return ImageDataset(images, targets=_targets(project, labels))
    return ImageDataset(images, masks=_masks(storage, labels, project.image_size))


def label_warnings(project: ProjectConfig, train_set: ImageDataset) -> list[str]:
    """Problems that do not stop a round but make its model weak; stored in its metrics."""
    if project.task != "classification" or train_set.targets is None:
        return []
    present = sorted(set(train_set.targets.tolist()))
    if len(present) >= 2:
        return []
    names = [project.classes[c] for c in present]
    return [
        f"The labeled images cover only {names} of {len(project.classes)} classes: the model "
        "cannot tell classes apart yet, so its uncertainty scores mean little and selection "
        "leans on diversity. Label images of the other classes (or import some)."
    ]


def num_outputs(project: ProjectConfig) -> int:
    """The model's ``num_classes``: the class count, or 1 (one binary mask)."""
    if project.task == "segmentation":
        return 1
    if len(project.classes) < 2:
        raise RoundConfigError(
            f"Project {project.id} is a classification project with "
            f"{len(project.classes)} class(es); it needs at least 2."
        )
    return len(project.classes)


def dataset_fingerprint(rows: RoundRows, labeled: Sequence[int]) -> dict[str, Any]:
    """Identifies a training set, so a resumed run only resumes on the very same data."""
    ids = [rows.pool[i].id for i in labeled]
    labels = [(rows.labels[i].class_index, rows.labels[i].mask_key) for i in ids]
    return {"image_ids": ids, "labels": labels}
