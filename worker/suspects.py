"""Suspect labels (issue 15): consensus labels a model contradicts with confidence.

With several readers, an agreed label can still be wrong (the readers may share a mistake).
At the start of each round of a classification project with ``overlap`` >= 2, this takes
every pool image whose label is the readers' agreement or majority (not one a reviewer or an
admin settled), and the newest stored prediction of it. A prediction is stored only for an
image that was unlabeled when a round scored it, so it is out of sample: the model never
trained on that label. Confident learning (``cleanlab.filter.find_label_issues``, Northcutt et
al. 2021) then names the labels whose class the predictions contradict beyond what the
model's per-class confidence explains; each becomes a ``suspect`` review item for a reviewer,
unless the image was reviewed before. Masks are not checked.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.labels.consensus import current_labels
from app.labels.kinds import kind_of
from app.models import Image, Prediction, Project, ReviewItem, Split

log = logging.getLogger(__name__)

SUSPECT = "suspect"
MIN_LABELS = 20  # below this, per-class confidence thresholds mean little


def find_suspects(labels: np.ndarray, probs: np.ndarray) -> list[int]:
    """Indices of the likely wrong labels, most likely first (cleanlab, self-confidence)."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings():  # it warns about classes with few examples
        warnings.simplefilter("ignore")
        found = find_label_issues(
            labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1
        )
    return [int(i) for i in found]


def _newest_predictions(session: Session, image_ids: list[int]) -> dict[int, list[Any]]:
    newest = (
        select(func.max(Prediction.id))
        .where(Prediction.image_id.in_(image_ids), Prediction.class_probs.is_not(None))
        .group_by(Prediction.image_id)
    )
    rows = session.execute(
        select(Prediction.image_id, Prediction.class_probs).where(Prediction.id.in_(newest))
    )
    return {r.image_id: r.class_probs for r in rows}


def flag_suspects(sessions: sessionmaker[Session], project_id: int, snapshot: int | None) -> int:
    """Open a ``suspect`` review item for each suspect label (see the module doc); returns how
    many were opened."""
    with unit_of_work(sessions) as session:
        project = session.get_one(Project, project_id)
        if project.overlap < 2 or not kind_of(project.task).takes_class:
            return 0
        pool = set(
            session.scalars(
                select(Image.id).where(
                    Image.project_id == project_id, Image.split == Split.pool.value
                )
            )
        )
        agreed = {
            image_id: c.class_index
            for image_id, c in current_labels(session, project, up_to=snapshot).items()
            if image_id in pool and c.state in ("agreed", "majority") and c.class_index is not None
        }
        n_classes = len(project.classes)
        predicted = {
            image_id: probs
            for image_id, probs in _newest_predictions(session, sorted(agreed)).items()
            if len(probs) == n_classes
        }
        ids = sorted(predicted)
        labels = np.array([agreed[i] for i in ids], dtype=np.int64)
        if len(ids) < MIN_LABELS or len(set(labels.tolist())) < 2:
            return 0
        probs = np.array([predicted[i] for i in ids], dtype=np.float64)
        probs = probs / probs.sum(axis=1, keepdims=True)
        reviewed = set(
            session.scalars(select(ReviewItem.image_id).where(ReviewItem.project_id == project_id))
        )
        opened = 0
        for k in find_suspects(labels, probs):
            image_id = ids[k]
            if image_id in reviewed:
                continue
            detail = {
                "label": int(labels[k]),
                "predicted": int(probs[k].argmax()),
                "confidence": round(float(probs[k].max()), 4),
            }
            item = ReviewItem(
                project_id=project_id, image_id=image_id, reason=SUSPECT, detail=detail
            )
            try:
                with session.begin_nested():
                    session.add(item)
                    session.flush()
            except IntegrityError:  # an item opened meanwhile
                continue
            opened += 1
    if opened:
        log.info("project %s: %d suspect labels sent to review", project_id, opened)
    return opened
