"""What a round reads: the project's settings, its images and their labels at the snapshot,
then the pixels, decoded once into memory at the model's resolution.

The database reads are short read transactions that return plain values; file decoding runs
with no transaction open, on a few threads (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker, unit_of_work
from app.labels.consensus import current_labels
from app.models import Image, Label, ModelVersion, Prediction, Project, QueueItem, Round, Split
from app.settings import Settings
from app.storage import Storage
from ml.checkpoint import load_checkpoint
from ml.data import ImageDataset, load_image, load_mask
from ml.infer import PoolOutput
from ml.stopping import prediction_agreement
from ml.train import resolve_device
from worker.records import Claim

log = logging.getLogger(__name__)

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
    cold_start: str = "random"
    group_key: str | None = None
    exclude_labeled_groups: bool = False


@dataclass(frozen=True)
class ImageRow:
    id: int
    storage_key: str
    width: int
    height: int


@dataclass(frozen=True)
class LabelRow:
    """An image's current label (``app.labels.consensus``): a class, or the masks whose
    per-pixel majority is the mask (one mask: itself)."""

    image_id: int
    class_index: int | None
    mask_keys: tuple[str, ...] = ()


@dataclass
class RoundRows:
    """The round's inputs as plain values: pool and test images ordered by id, and the current
    label (newest with id <= snapshot) of every labeled one."""

    project: ProjectConfig
    pool: list[ImageRow]
    test: list[ImageRow]
    labels: dict[int, LabelRow]
    groups: np.ndarray | None = None  # int64 [len(pool)]: group of each pool image, -1 = none

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


def _current_labels(session: Session, project: Project, snapshot: int) -> dict[int, LabelRow]:
    """The current label of each image among label ids <= ``snapshot``: the newest, or with
    several readers their consensus (``app.labels.consensus``, the one rule)."""
    found = current_labels(session, project, up_to=snapshot)
    return {i: LabelRow(i, c.class_index, c.mask_keys) for i, c in found.items()}


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
            cold_start=p.cold_start,
            group_key=p.group_key,
            exclude_labeled_groups=p.exclude_labeled_groups,
        )
        pool = _images(session, p.id, Split.pool)
        test = _images(session, p.id, Split.test)
        labels = _current_labels(session, p, claim.label_snapshot_id)
        groups = None if p.group_key is None else _pool_groups(session, p.id, p.group_key, pool)
    return RoundRows(project, pool, test, labels, groups)


def _pool_groups(
    session: Session, project_id: int, key: str, pool: Sequence[ImageRow]
) -> np.ndarray:
    """int64 [len(pool)]: the pool images' ``meta[key]`` values numbered by first appearance
    (in pool order); -1 where the key is missing, null or empty."""
    rows = session.execute(
        select(Image.id, Image.meta).where(
            Image.project_id == project_id, Image.split == Split.pool.value
        )
    )
    value = {r.id: (r.meta or {}).get(key) for r in rows}
    ids: dict[str, int] = {}
    out = np.full(len(pool), -1, dtype=np.int64)
    for i, row in enumerate(pool):
        v = value.get(row.id)
        if v is not None and v != "":
            out[i] = ids.setdefault(str(v), len(ids))
    return out


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


def _mask(storage: Storage, key: str, size: int) -> np.ndarray:
    try:
        return load_mask(storage.path(key), size)
    except (OSError, ValueError) as exc:
        raise RoundConfigError(f"Cannot read mask {key}: {exc}") from exc


def _masks(storage: Storage, labels: Sequence[LabelRow], size: int) -> np.ndarray:
    """uint8 [N, size, size]: each label's mask; with several readers' masks, the pixels more
    than half of them mark (per-pixel majority at the training size)."""
    out = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, lab in enumerate(labels):
        if not lab.mask_keys:
            raise RoundConfigError(
                f"Image {lab.image_id} is labeled with a class, not a mask; this is a "
                "segmentation project: label it again with a mask."
            )
        votes = np.sum([_mask(storage, key, size) for key in lab.mask_keys], axis=0)
        out[i] = (2 * votes > len(lab.mask_keys)).astype(np.uint8)
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
    labels = [(rows.labels[i].class_index, list(rows.labels[i].mask_keys)) for i in ids]
    return {"image_ids": ids, "labels": labels}


STOP_SET_MASKS = 1000  # segmentation: masks compared per round (PNG decoding is the cost)


@dataclass(frozen=True)
class PreviousPredictions:
    """The newest earlier round's predictions: ``image_id -> (class_probs, mask_key)``."""

    round_number: int
    by_image: dict[int, tuple[list[float] | None, str | None]]


def read_previous_predictions(
    sessions: sessionmaker[Session], claim: Claim
) -> PreviousPredictions | None:
    """The predictions of the project's newest round before this one that has any (a cancelled
    or failed round wrote none), or None."""
    has_predictions = select(Prediction.id).where(Prediction.model_version_id == ModelVersion.id)
    with unit_of_work(sessions) as session:
        latest = session.execute(
            select(ModelVersion.id, Round.number)
            .join(Round, Round.id == ModelVersion.round_id)
            .where(
                Round.project_id == claim.project_id,
                Round.number < claim.number,
                has_predictions.exists(),
            )
            .order_by(Round.number.desc())
            .limit(1)
        ).first()
        if latest is None:
            return None
        rows = session.execute(
            select(Prediction.image_id, Prediction.class_probs, Prediction.mask_key).where(
                Prediction.model_version_id == latest.id
            )
        )
        return PreviousPredictions(
            latest.number, {r.image_id: (r.class_probs, r.mask_key) for r in rows}
        )


def _stored_mask(mask: np.ndarray, row: ImageRow, size: int) -> np.ndarray:
    """``mask`` as it reads back from its prediction PNG (resized to the image's size and back,
    nearest), so both rounds' masks go through the same round trip."""
    image = PILImage.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    stored = image.resize((row.width, row.height), PILImage.Resampling.NEAREST)
    back = np.asarray(stored.resize((size, size), PILImage.Resampling.NEAREST))
    return (back > 127).astype(np.uint8)  # as ml.data.load_mask reads a 0/255 PNG


def stopping_signal(
    sessions: sessionmaker[Session],
    storage: Storage,
    claim: Claim,
    rows: RoundRows,
    out: PoolOutput,
) -> dict[str, Any] | None:
    """Agreement of this round's predictions with the previous round's on the pool images that
    are unlabeled now and were predicted then ("stabilizing predictions", ml.stopping):
    classification compares predicted classes (all such images), segmentation the masks of a
    fixed stop set (at most ``STOP_SET_MASKS`` images, the same ones every round while they stay
    unlabeled). None before the second trained round."""
    prev = read_previous_predictions(sessions, claim)
    if prev is None:
        return None
    both = [
        i
        for i, row in enumerate(rows.pool)
        if row.id not in rows.labels and row.id in prev.by_image
    ]
    if out.probs is not None:
        num_classes = out.probs.shape[1]
        probs = {i: prev.by_image[rows.pool[i].id][0] or [] for i in both}
        both = [i for i in both if len(probs[i]) == num_classes]
        before = np.array([int(np.argmax(probs[i])) for i in both], dtype=np.int64)
        result = prediction_agreement(before, out.probs[both].argmax(1), num_classes)
    else:
        assert out.masks is not None
        both = [i for i in both if prev.by_image[rows.pool[i].id][1] is not None]
        both = sorted(both, key=lambda i: (rows.pool[i].id * 2654435761) % 2**32)
        both = sorted(both[:STOP_SET_MASKS])
        size = out.masks.shape[1]
        before_masks, after = [], []
        for i in both:
            key = prev.by_image[rows.pool[i].id][1]
            assert key is not None
            try:
                before_masks.append(load_mask(storage.path(key), size))
            except (OSError, ValueError):  # a deleted or damaged old prediction: not compared
                continue
            after.append(_stored_mask(out.masks[i], rows.pool[i], size))
        shape = (len(after), size, size)
        result = prediction_agreement(
            np.asarray(before_masks, dtype=np.uint8).reshape(shape),
            np.asarray(after, dtype=np.uint8).reshape(shape),
            2,
        )
    return {**result, "previous_round": prev.round_number}


def resume_state(env: RoundEnv, key: str, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The resumable checkpoint an earlier attempt left at ``key`` for the same work (its
    ``coreloop_resume`` equals ``fingerprint``), if any: a round's or a warm start's."""
    if not env.storage.exists(key):
        return None
    try:
        state = load_checkpoint(env.storage.path(key))
    except Exception:  # a damaged file only costs the epochs it held
        log.warning("cannot read %s; starting from scratch", key, exc_info=True)
        return None
    if state.get("coreloop_resume") != fingerprint:
        return None
    log.info("resuming %s after epoch %s", key, state.get("epoch"))
    return state
