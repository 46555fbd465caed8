"""The current label of an image: one rule, for the worker, the exports and the API (issue 15).

Labels are append-only; what counts as an image's label depends on how many readers the
project wants (``overlap``, k):

- **k = 1.** The newest usable label (a class or a mask), whoever wrote it. State ``single``.
- **k >= 2 (several readers).** A *read* is a reader's newest usable label of the image (one
  per reader). Labels by an admin or from an import settle the image outright: the newest of
  them is the label (state ``settled``); so does a reviewer's (source ``review``). Otherwise
  the image has a label only once it has k reads, and none while a review item holds it as
  disputed (``app.review.service``):
  - classes: the class most reads chose (state ``agreed`` when all agree, ``majority`` when
    not); a tie for the most reads is *disputed* and the image has no label until an admin
    settles it;
  - masks: the per-pixel majority of the reads' masks (more than half of the readers mark the
    pixel), combined where the masks are read (``mask_keys`` lists them; state ``agreed``).

Only these labels train the model and count as labeled for rounds and the learning curve.
Images with fewer than k reads, or disputed, are **pending**: still being read, or waiting
for adjudication.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.labels.kinds import CurrentLabel, Disputed, LabelKind, Read, State, kind_of
from app.models import Label, LabelSource, Project, ReviewItem, ReviewState, Role, User

# Sources whose labels settle an image outright (as do an admin's).
_SETTLING = frozenset({LabelSource.import_.value, LabelSource.review.value})
_CHUNK = 500


def latest_reads(reads: Sequence[Read]) -> list[Read]:
    """Each reader's newest read (labels of admins and imports are not reads), oldest first."""
    per_reader: dict[int | None, Read] = {}
    for read in sorted(reads, key=lambda r: r.label_id):  # oldest first: the newest wins
        if not read.authoritative:
            per_reader[read.author_id] = read
    return sorted(per_reader.values(), key=lambda r: r.label_id)


def _alone(read: Read, state: State) -> CurrentLabel:
    keys = (read.mask_key,) if read.mask_key else ()
    return CurrentLabel(read.image_id, read.class_index, keys, (read.label_id,), state)


def decide(reads: Sequence[Read], overlap: int, kind: LabelKind) -> CurrentLabel | Disputed | None:
    """The rule for one image's usable labels (any order); None while still pending.

    With k >= 2 reads, ``kind`` combines them (:meth:`LabelKind.combine`).
    """
    if not reads:
        return None
    ordered = sorted(reads, key=lambda r: r.label_id)
    if overlap <= 1:
        return _alone(ordered[-1], "single")
    settling = [r for r in ordered if r.authoritative]
    if settling:
        return _alone(settling[-1], "settled")
    latest = latest_reads(ordered)
    if len(latest) < overlap:
        return None
    return kind.combine(latest)


def _reads(
    session: Session, project_id: int, image_ids: Iterable[int] | None, up_to: int | None
) -> dict[int, list[Read]]:
    usable = [
        Label.project_id == project_id,
        Label.class_index.is_not(None) | Label.mask_key.is_not(None),
    ]
    if up_to is not None:
        usable.append(Label.id <= up_to)
    query = (
        select(
            Label.id,
            Label.image_id,
            Label.author_id,
            Label.class_index,
            Label.mask_key,
            Label.source,
            User.role,
        )
        .outerjoin(User, User.id == Label.author_id)
        .where(*usable)
    )
    chunks: list[list[int] | None]
    if image_ids is None:
        chunks = [None]
    else:
        wanted = sorted(set(image_ids))
        chunks = [wanted[i : i + _CHUNK] for i in range(0, len(wanted), _CHUNK)]
    found: dict[int, list[Read]] = defaultdict(list)
    for chunk in chunks:
        stmt = query if chunk is None else query.where(Label.image_id.in_(chunk))
        for row in session.execute(stmt):
            authoritative = row.source in _SETTLING or row.role == Role.admin
            found[row.image_id].append(
                Read(
                    row.id,
                    row.image_id,
                    row.author_id,
                    row.class_index,
                    row.mask_key,
                    authoritative,
                )  # fmt: skip
            )
    return found


def reads_of_images(
    session: Session, project_id: int, image_ids: Iterable[int], *, up_to: int | None = None
) -> dict[int, list[Read]]:
    """Every usable label of these images (with id <= ``up_to``), by image, oldest first."""
    found = _reads(session, project_id, image_ids, up_to)
    return {i: sorted(reads, key=lambda r: r.label_id) for i, reads in found.items()}


def disputed_image_ids(session: Session, project_id: int) -> set[int]:
    """Images with an open ``disputed`` review item (``app.review.service``, e.g. masks whose
    readers' Dice is too low): they have no label until a reviewer settles them."""
    return set(
        session.scalars(
            select(ReviewItem.image_id).where(
                ReviewItem.project_id == project_id,
                ReviewItem.state == ReviewState.open.value,
                ReviewItem.reason == "disputed",
            )
        )
    )


def reads_of_project(
    session: Session, project_id: int, *, up_to: int | None = None
) -> dict[int, list[Read]]:
    """Every usable label of the project by image (the rule's input; ``app.agreement.service``
    compares the reads)."""
    return _reads(session, project_id, None, up_to)


def current_labels(
    session: Session,
    project: Project,
    *,
    image_ids: Iterable[int] | None = None,
    up_to: int | None = None,
) -> dict[int, CurrentLabel]:
    """The current label of each of ``image_ids`` (all the project's images when None) that has
    one, among the labels with id <= ``up_to`` (all when None)."""
    found = {}
    kind = kind_of(project.task)
    held = disputed_image_ids(session, project.id) if project.overlap >= 2 else set()
    for image_id, reads in _reads(session, project.id, image_ids, up_to).items():
        decided = decide(reads, project.overlap, kind)
        if isinstance(decided, CurrentLabel) and (
            image_id not in held or decided.state == "settled"
        ):
            found[image_id] = decided
    return found


def disputed_images(
    session: Session, project: Project, *, up_to: int | None = None
) -> list[Disputed]:
    """The images whose reads tie, by image id: they wait for adjudication."""
    found = []
    kind = kind_of(project.task)
    for _, reads in sorted(_reads(session, project.id, None, up_to).items()):
        decided = decide(reads, project.overlap, kind)
        if isinstance(decided, Disputed):
            found.append(decided)
    return found
