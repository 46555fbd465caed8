"""Reading a project's images and labels for an export, one page at a time.

Each page is read with a fresh session and query, and the session is closed before the page's
rows are handed out, so a slow client holds no transaction (nor SQLite's write lock). The ids
seen when the export began bound every page: a consistent cut, whatever is added meanwhile.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Image, Label, ModelVersion, Prediction
from app.services.masks import Mask, decode_png_mask
from app.services.queue import require_project
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

    def class_name(self, index: int) -> str:
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)


@dataclass(frozen=True)
class ImageRow:
    """One image with its labels (oldest first) and its model predictions."""

    image: Image
    labels: list[Label]
    predictions: list[Prediction]


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
            found = _labels_of(session, ids, snap.max_label_id, history) if labels and ids else {}
            preds = _predictions_of(session, snap.id, ids, history) if predictions and ids else {}
        if not images:
            return
        for image in images:
            yield ImageRow(image, found.get(image.id, []), preds.get(image.id, []))
        if len(images) < PAGE_SIZE:
            return
        after = images[-1].id


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
    return decode_png_mask(storage.read_bytes(key), (image.height, image.width))
