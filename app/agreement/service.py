"""How much a project's readers agree (issue 15): ``GET /projects/{id}/agreement``.

Reads are as in ``app.labels.consensus``: each reader's newest usable label of an image, by
annotators (labels of admins and imports settle an image; they are not reads). Only images
with two reads or more are compared.

- **Classes.** Cohen's kappa when the project wants two readers (each pair of reads with the
  reader of lower user id as rows); Fleiss' kappa (on the first ``overlap`` reads of each image
  that has them) when it wants more. The confusion between readers counts every unordered pair
  of reads of an image, both ways, so it is symmetric. Per
  annotator: their kappa against the other readers of the same images (Cohen's, over those
  pairs) and their raw agreement.
- **Masks.** Dice and IoU of every pair of reads of an image, averaged; per annotator over the
  pairs they are in.
- **Adjudication rate.** The share of the images with ``overlap`` reads whose reads tie, or
  that the review queue took as disputed (masks under the Dice threshold), whether or not
  they have been settled since.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.labels.consensus import decide, latest_reads, reads_of_project
from app.labels.kinds import Disputed, Read, kind_of
from app.labels.masks import dice_iou, read_stored_mask
from app.models import Image, Project, ReviewItem, User
from app.storage import Storage


def cohen_kappa(pairs: list[tuple[int, int]], n_classes: int) -> float | None:
    """Cohen's kappa of paired ratings; None without pairs or when chance agreement is 1."""
    if not pairs:
        return None
    table = np.zeros((n_classes, n_classes))
    for a, b in pairs:
        table[a, b] += 1
    n = table.sum()
    observed = np.trace(table) / n
    expected = float((table.sum(axis=0) * table.sum(axis=1)).sum() / n**2)
    if expected >= 1.0:
        return None
    return float((observed - expected) / (1.0 - expected))


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of ``counts`` [items, classes] (each row: how many raters chose each
    class; every row the same number of raters, at least 2)."""
    if counts.shape[0] == 0:
        return None
    raters = counts.sum(axis=1)
    if raters.min() != raters.max() or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of raters per item")
    m = float(raters[0])
    p_item = ((counts * (counts - 1)).sum(axis=1)) / (m * (m - 1))
    p_class = counts.sum(axis=0) / counts.sum()
    observed, expected = float(p_item.mean()), float((p_class**2).sum())
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


@dataclass
class _PerReader:
    reads: int = 0
    agreed: int = 0
    pairs: int = 0
    dice: float = 0.0
    iou: float = 0.0
    kappa: float | None = None


def project_agreement(session: Session, storage: Storage, project: Project) -> dict[str, Any]:
    """The agreement figures of the module doc, as returned by the API."""
    by_image = {
        image_id: latest_reads(reads)
        for image_id, reads in reads_of_project(session, project.id).items()
    }
    compared = {i: r for i, r in by_image.items() if len(r) >= 2}
    k = max(2, project.overlap)
    full = {i: r for i, r in compared.items() if len(r) >= k}
    # Ties between classes, and reads a review item held as disputed (masks under the Dice
    # threshold), settled since or not.
    flagged = set(
        session.scalars(
            select(ReviewItem.image_id).where(
                ReviewItem.project_id == project.id, ReviewItem.reason == "disputed"
            )
        )
    )
    kind = kind_of(project.task)
    disputed = sum(
        isinstance(decide(r, k, kind), Disputed) or i in flagged for i, r in full.items()
    )
    per: dict[int | None, _PerReader] = defaultdict(_PerReader)
    for reads in compared.values():
        for read in reads:
            per[read.author_id].reads += 1
    out: dict[str, Any] = {
        "project_id": project.id,
        "task": project.task,
        "overlap": project.overlap,
        "images_compared": len(compared),
        "images_with_all_reads": len(full),
        "adjudication_rate": disputed / len(full) if full else None,
    }
    if kind.takes_class:
        out.update(_classes(project, compared, per))
    else:
        out.update(_masks(session, storage, compared, per))
    rows = session.execute(select(User.id, User.name).where(User.id.in_([i for i in per if i])))
    names = {r.id: r.name for r in rows}
    classification = kind.takes_class
    out["annotators"] = [
        _reader_out(user_id, names.get(user_id or 0), stats, classification)
        for user_id, stats in sorted(per.items(), key=lambda kv: kv[0] or 0)
    ]
    return out


def _reader_out(
    user_id: int | None, name: str | None, stats: _PerReader, classification: bool
) -> dict[str, Any]:
    mean = lambda total: total / stats.pairs if stats.pairs else None  # noqa: E731
    figures: dict[str, Any] = (
        {"kappa": stats.kappa, "agreement": mean(stats.agreed)}
        if classification
        else {"mean_dice": mean(stats.dice), "mean_iou": mean(stats.iou)}
    )
    return {"user_id": user_id, "name": name, "reads": stats.reads, "pairs": stats.pairs,
            **figures}  # fmt: skip


def _classes(
    project: Project, compared: dict[int, list[Read]], per: dict[int | None, _PerReader]
) -> dict[str, Any]:
    n = len(project.classes)
    pairs: list[tuple[int, int]] = []
    mine: dict[int | None, list[tuple[int, int]]] = defaultdict(list)
    for reads in compared.values():
        # Pairs in reader-id order: with two readers, Cohen's table has the first as rows.
        rated = sorted(
            ((r.author_id, r.class_index) for r in reads
             if r.class_index is not None and 0 <= r.class_index < n),
            key=lambda r: r[0] or 0,
        )  # fmt: skip
        for (first, x), (second, y) in combinations(rated, 2):
            pairs.append((x, y))
            for me, mine_, theirs in ((first, x, y), (second, y, x)):
                mine[me].append((mine_, theirs))
                per[me].pairs += 1
                per[me].agreed += int(mine_ == theirs)
    confusion = np.zeros((n, n), dtype=np.int64)
    for x, y in pairs:
        confusion[x, y] += 1
        confusion[y, x] += 1
    k = project.overlap
    if k <= 2:
        kappa, method = cohen_kappa(pairs, n), "cohen"
    else:
        rows = []
        for reads in compared.values():
            classes = [r.class_index for r in reads if r.class_index is not None][:k]
            if len(classes) == k:
                rows.append(np.bincount(np.array(classes), minlength=n))
        kappa = fleiss_kappa(np.array(rows).reshape(-1, n)) if rows else None
        method = "fleiss"
    for user_id, stats in per.items():
        stats.kappa = cohen_kappa(mine[user_id], n)
    agreed = sum(a == b for a, b in pairs)
    return {
        "kappa": kappa,
        "kappa_method": method,
        "pairs": len(pairs),
        "agreement": agreed / len(pairs) if pairs else None,
        "classes": [str(c) for c in project.classes],
        "confusion": confusion.tolist(),
    }


def _masks(
    session: Session,
    storage: Storage,
    compared: dict[int, list[Read]],
    per: dict[int | None, _PerReader],
) -> dict[str, Any]:
    rows = session.execute(
        select(Image.id, Image.height, Image.width).where(Image.id.in_(list(compared)))
    )
    sizes = {r.id: (r.height, r.width) for r in rows}
    dices: list[float] = []
    ious: list[float] = []
    for image_id, reads in compared.items():
        masked = [r for r in reads if r.mask_key]
        loaded = {
            r.label_id: read_stored_mask(storage, r.mask_key, sizes[image_id])  # type: ignore[arg-type]
            for r in masked
        }
        for a, b in combinations(masked, 2):
            dice, iou = dice_iou(loaded[a.label_id], loaded[b.label_id])
            dices.append(dice)
            ious.append(iou)
            for me in (a, b):
                per[me.author_id].pairs += 1
                per[me.author_id].dice += dice
                per[me.author_id].iou += iou
    return {
        "pairs": len(dices),
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_iou": float(np.mean(ious)) if ious else None,
    }
