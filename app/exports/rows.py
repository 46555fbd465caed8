"""Reading a project's images and labels for an export, one page at a time.

Each page is read with a fresh session and query, and the session is closed before the page's
rows are handed out, so a slow client holds no transaction (nor SQLite's write lock). The ids
seen when the export began bound every page: a consistent cut, whatever is added meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.labels.consensus import current_labels, latest_reads, reads_of_images
from app.labels.masks import Mask, read_stored_mask
from app.models import Image, Label, ModelVersion, Prediction
from app.queue.service import require_project
from app.storage import Storage

PAGE_SIZE = 200


@dataclass(frozen=True)
class ProjectSnapshot:
    """What an export needs of the project, and the id bounds that make it a consistent cut."""

    id: int
    name: str
    task: str
    classes: list[str]
    max_image_id: int
    max_label_id: int
    overlap: int = 1  # readers per image: with 2 or more, exports carry every read

    def class_name(self, index: int) -> str:
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)


@dataclass(frozen=True)
class Consensus:
    """With several readers: the image's label under ``app.labels.consensus`` when it is not
    one of the rows' labels as is (an agreed or majority class, or the per-pixel majority of
    the reads' masks); ``label_ids`` are the reads it comes from."""

    class_index: int | None
    mask_keys: tuple[str, ...]
    label_ids: tuple[int, ...]
    state: str


@dataclass(frozen=True)
class ImageRow:
    """One image with its labels (oldest first) and its model predictions. With several
    readers and no ``history``: each reader's newest read and any settling label, and the
    ``consensus`` when it is none of them as is."""

    image: Image
    labels: list[Label]
    predictions: list[Prediction]
    consensus: Consensus | None = None


def snapshot_project(session: Session, project_id: int) -> ProjectSnapshot:
    project = require_project(session, project_id)
    max_image = session.scalar(select(func.max(Image.id)).where(Image.project_id == project.id))
    max_label = session.scalar(select(func.max(Label.id)).where(Label.project_id == project.id))
    return ProjectSnapshot(
        id=project.id,
        name=project.name,
        task=project.task,
        classes=[str(name) for name in project.classes],
        max_image_id=int(max_image or 0),
        max_label_id=int(max_label or 0),
        overlap=project.overlap,
    )


def iter_rows(
    sessions: sessionmaker[Session],
    snap: ProjectSnapshot,
    *,
    history: bool,
    labels: bool = True,
    predictions: bool = False,
) -> Iterator[ImageRow]:
    """Every image of the snapshot in id order, with its current label (``history``: all)."""
    after = 0
    while True:
        with sessions() as session:
            images = list(
                session.scalars(
                    select(Image)
                    .where(
                        Image.project_id == snap.id,
                        Image.id > after,
                        Image.id <= snap.max_image_id,
                    )
                    .order_by(Image.id)
                    .limit(PAGE_SIZE)
                )
            )
            ids = [image.id for image in images]
            readers = labels and not history and snap.overlap >= 2
            if readers and ids:
                found, agreed = _reads_of(session, snap, ids)
            else:
                found = (
                    _labels_of(session, ids, snap.max_label_id, history) if labels and ids else {}
                )
                agreed = {}
            preds = _predictions_of(session, snap.id, ids, history) if predictions and ids else {}
        if not images:
            return
        for image in images:
            yield ImageRow(
                image, found.get(image.id, []), preds.get(image.id, []), agreed.get(image.id)
            )
        if len(images) < PAGE_SIZE:
            return
        after = images[-1].id


def _reads_of(
    session: Session, snap: ProjectSnapshot, image_ids: list[int]
) -> tuple[dict[int, list[Label]], dict[int, Consensus]]:
    """Each reader's newest read and the newest settling label, by image; and the consensus
    of the images whose label is not one of those as is (``app.labels.consensus``)."""
    project = require_project(session, snap.id)
    reads = reads_of_images(session, snap.id, image_ids, up_to=snap.max_label_id)
    current = current_labels(session, project, image_ids=image_ids, up_to=snap.max_label_id)
    keep: set[int] = set()
    for image_reads in reads.values():
        keep.update(r.label_id for r in latest_reads(image_reads))
        settling = [r.label_id for r in image_reads if r.authoritative]
        keep.update(settling[-1:] if settling else [])
    found: dict[int, list[Label]] = defaultdict(list)
    if keep:
        for label in session.scalars(select(Label).where(Label.id.in_(keep)).order_by(Label.id)):
            found[label.image_id].append(label)
    agreed = {
        image_id: Consensus(c.class_index, c.mask_keys, c.label_ids, c.state)
        for image_id, c in current.items()
        if c.state in ("agreed", "majority")
    }
    return found, agreed


def _labels_of(
    session: Session, image_ids: list[int], max_label_id: int, history: bool
) -> dict[int, list[Label]]:
    usable = (
        Label.image_id.in_(image_ids),
        Label.id <= max_label_id,
        Label.class_index.is_not(None) | Label.mask_key.is_not(None),
    )
    stmt = select(Label).where(*usable)
    if not history:
        newest = select(func.max(Label.id)).where(*usable).group_by(Label.image_id)
        stmt = select(Label).where(Label.id.in_(newest))
    found: dict[int, list[Label]] = defaultdict(list)
    for label in session.scalars(stmt.order_by(Label.id)):
        found[label.image_id].append(label)
    return found


def _predictions_of(
    session: Session, project_id: int, image_ids: list[int], history: bool
) -> dict[int, list[Prediction]]:
    """Predictions of the project's newest model version (``history``: of every version)."""
    if history:
        versions = select(ModelVersion.id).where(ModelVersion.project_id == project_id)
    else:
        versions = select(func.max(ModelVersion.id)).where(ModelVersion.project_id == project_id)
    stmt = select(Prediction).where(
        Prediction.image_id.in_(image_ids), Prediction.model_version_id.in_(versions)
    )
    found: dict[int, list[Prediction]] = defaultdict(list)
    for prediction in session.scalars(stmt.order_by(Prediction.model_version_id)):
        found[prediction.image_id].append(prediction)
    return found


def read_mask(storage: Storage, key: str, image: Image) -> Mask:
    """A stored mask (label or prediction) of ``image`` as a bool array [height, width]."""
    return read_stored_mask(storage, key, (image.height, image.width))


def consensus_mask(storage: Storage, consensus: Consensus, image: Image) -> Mask:
    """The pixels more than half of the reads' masks mark."""
    votes = sum(read_mask(storage, key, image).astype(np.int32) for key in consensus.mask_keys)
    return np.asarray(2 * votes > len(consensus.mask_keys))
