"""The reviewer's queue (issue 15): disputed and spot-checked images, leased like the queue.

**What goes in.** When a read completes an image's ``overlap`` (k) reads, the labels service
calls :func:`check_image` in the same transaction:
- classes that tie (``app.labels.consensus``), or masks whose lowest pairwise Dice is below
  the project's ``mask_agreement``: a ``disputed`` item; the image has no label until settled;
- else, with the project's ``review_sample`` share, a ``spot_check`` item (drawn by a hash of
  the project and image ids, so the draw is the same on every run); the agreed label stands
  meanwhile.
At most one item per image is open.

**Leasing.** ``GET /review`` hands out open items to reviewers (and admins) in id order: the
caller's own unexpired leases first, then free ones (never leased, or expired), never one the
caller skipped. Each is taken by a conditional UPDATE, so two reviewers never hold the same
item. The lease lasts the project's ``lease_ttl_seconds``.

**Settling.** The reviewer picks one of the reads, or gives a class or a mask: that becomes a
label with source ``review``, which settles the image (the consensus rule takes it as is).
Or the reviewer sends the image back for another read: its queue item wants one more label,
so another annotator (never one who read it) reads it, and the reads are checked again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from itertools import combinations

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.labels.consensus import decide, latest_reads, reads_of_images
from app.labels.kinds import Disputed, Read, kind_of
from app.labels.masks import decode_rle_mask, dice_iou, read_stored_mask, store_mask
from app.members.service import require_member
from app.models import (
    Event,
    Image,
    Label,
    LabelSource,
    MemberRole,
    Project,
    QueueItem,
    ReviewItem,
    ReviewSkip,
    ReviewState,
    User,
    utcnow,
)
from app.review.schemas import ReviewEntry, ReviewRead, ReviewSettle
from app.storage import Storage

DISPUTED, SPOT_CHECK = "disputed", "spot_check"


@dataclass(frozen=True)
class ImageFacts:
    """What :func:`check_image` needs of the image and its project."""

    project_id: int
    image_id: int
    task: str
    height: int
    width: int
    overlap: int
    review_sample: float
    mask_agreement: float


def _drawn(project_id: int, image_id: int) -> float:
    """A number in [0, 1) fixed by the ids: the spot-check draw."""
    digest = hashlib.sha256(f"spot-check:{project_id}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def lowest_dice(storage: Storage, reads: list[Read], size: tuple[int, int]) -> float | None:
    """The lowest Dice between two reads' masks (None with fewer than two masks)."""
    masks = [read_stored_mask(storage, r.mask_key, size) for r in reads if r.mask_key]
    scores = [dice_iou(a, b)[0] for a, b in combinations(masks, 2)]
    return min(scores) if scores else None


def _open_item(session: Session, facts: ImageFacts, reason: str, detail: dict[str, object]) -> None:
    item = ReviewItem(
        project_id=facts.project_id, image_id=facts.image_id, reason=reason, detail=detail
    )
    try:
        with session.begin_nested():  # a concurrent read of the same image opened it first
            session.add(item)
            session.flush()
    except IntegrityError:
        return


def check_image(session: Session, storage: Storage, facts: ImageFacts) -> None:
    """After a read of a project with several readers: open a review item if its reads now
    disagree, or draw it for a spot check (see the module doc)."""
    reads = reads_of_images(session, facts.project_id, [facts.image_id]).get(facts.image_id, [])
    if any(r.authoritative for r in reads):
        return  # settled already
    latest = latest_reads(reads)
    if len(latest) < facts.overlap:
        return
    earlier = session.execute(
        select(ReviewItem.state).where(ReviewItem.image_id == facts.image_id)
    ).scalars().all()  # fmt: skip
    if ReviewState.open in earlier:
        return
    decided = decide(reads, facts.overlap, kind_of(facts.task))
    if isinstance(decided, Disputed):
        _open_item(session, facts, DISPUTED, {"class_indexes": list(decided.class_indexes)})
        return
    if decided is not None and len(decided.mask_keys) >= 2:
        dice = lowest_dice(storage, latest, (facts.height, facts.width))
        if dice is not None and dice < facts.mask_agreement:
            _open_item(session, facts, DISPUTED, {"lowest_dice": round(dice, 4)})
            return
    drawn = _drawn(facts.project_id, facts.image_id) < facts.review_sample
    if not earlier and facts.review_sample > 0 and drawn:
        _open_item(session, facts, SPOT_CHECK, {})


# -- the reviewer's side ------------------------------------------------------------------------


def _require_reviewer(session: Session, user: User, project_id: int) -> None:
    if require_member(session, user, project_id) == MemberRole.annotator:
        raise Forbidden(
            f"The review queue of project {project_id} is for its reviewers and admins; "
            f"{user.name!r} is an annotator there.",
            code="ReviewersOnly",
        )


def _entry(session: Session, project: Project, item: ReviewItem) -> ReviewEntry:
    reads = reads_of_images(session, project.id, [item.image_id]).get(item.image_id, [])
    latest = latest_reads(reads)
    authors = [r.author_id for r in latest if r.author_id]
    rows = session.execute(select(User.id, User.name).where(User.id.in_(authors)))
    names = {row.id: row.name for row in rows}
    classes = [str(c) for c in project.classes]
    return ReviewEntry(
        id=item.id,
        project_id=project.id,
        image_id=item.image_id,
        image_url=f"/images/{item.image_id}/file",
        reason=item.reason,
        detail=item.detail,
        expires_at=item.lease_expires_at,
        reads=[
            ReviewRead(
                label_id=r.label_id,
                author_id=r.author_id,
                author_name=names.get(r.author_id or 0),
                class_index=r.class_index,
                class_name=classes[r.class_index]
                if r.class_index is not None and 0 <= r.class_index < len(classes)
                else None,
                mask_url=f"/labels/{r.label_id}/mask" if r.mask_key else None,
            )
            for r in latest
        ],
    )


def lease_review_items(
    session: Session, user: User, project_id: int, limit: int
) -> list[ReviewEntry]:
    """The caller's leased items, then newly leased free ones, ``limit`` in all."""
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"Project {project_id} does not exist.", code="ProjectNotFound")
    _require_reviewer(session, user, project_id)
    now = utcnow()
    expires = now + timedelta(seconds=project.lease_ttl_seconds)
    open_items = (
        ReviewItem.project_id == project_id,
        ReviewItem.state == ReviewState.open.value,
    )
    held = list(
        session.scalars(
            select(ReviewItem)
            .where(*open_items, ReviewItem.leased_by == user.id, ReviewItem.lease_expires_at > now)
            .order_by(ReviewItem.id)
            .limit(limit)
        )
    )
    free_now = or_(ReviewItem.leased_by.is_(None), ReviewItem.lease_expires_at <= now)
    skipped = select(ReviewSkip.review_item_id).where(ReviewSkip.user_id == user.id)
    candidates = session.scalars(
        select(ReviewItem.id)
        .where(*open_items, free_now, ReviewItem.id.not_in(skipped))
        .order_by(ReviewItem.id)
        .limit(max(0, limit - len(held)) * 2)
    ).all()
    taken: list[int] = []
    for item_id in candidates:
        if len(held) + len(taken) >= limit:
            break
        got = session.execute(
            update(ReviewItem)
            .where(ReviewItem.id == item_id, *open_items, free_now)
            .values(leased_by=user.id, lease_expires_at=expires)
            .returning(ReviewItem.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
        if got is not None:
            taken.append(got)
    new = [session.get_one(ReviewItem, i, populate_existing=True) for i in taken]
    return [_entry(session, project, item) for item in held + new]


def _own_item(session: Session, user: User, item_id: int) -> ReviewItem:
    item = session.get(ReviewItem, item_id, populate_existing=True)
    if item is None:
        raise NotFound(f"Review item {item_id} does not exist.", code="ReviewItemNotFound")
    _require_reviewer(session, user, item.project_id)
    if item.state != ReviewState.open.value:
        raise Conflict(f"Review item {item_id} is {item.state}, not open.", code="ReviewNotOpen")
    if item.leased_by not in (None, user.id) and (item.lease_expires_at or utcnow()) > utcnow():
        raise Conflict(
            f"Review item {item_id} is leased by another reviewer until "
            f"{item.lease_expires_at.isoformat() if item.lease_expires_at else '?'}.",
            code="ReviewLeasedByOther",
        )
    return item


def _settled_content(
    session: Session,
    storage: Storage,
    project: Project,
    item: ReviewItem,
    body: ReviewSettle,
) -> tuple[int | None, str | None]:
    """The settling label's class index and mask key, from a picked read or the body."""
    if body.label_id is not None:
        read = session.get(Label, body.label_id)
        if read is None or read.image_id != item.image_id:
            raise InvalidInput(
                f"Label {body.label_id} is not a read of image {item.image_id}.",
                code="NotARead",
            )
        return read.class_index, read.mask_key
    if kind_of(project.task).takes_mask:
        if body.mask_rle is None:
            raise InvalidInput("Settle a segmentation item with label_id or mask_rle.")
        image = session.get_one(Image, item.image_id)
        mask = decode_rle_mask(body.mask_rle, (image.height, image.width))
        return None, store_mask(session, storage, project.id, mask)
    classes = [str(c) for c in project.classes]
    if body.class_name is not None:
        if body.class_name not in classes:
            raise InvalidInput(f"Unknown class {body.class_name!r}; the classes are {classes}.")
        return classes.index(body.class_name), None
    if body.class_index is None or not 0 <= body.class_index < len(classes):
        raise InvalidInput(
            f"Settle a classification item with label_id, class_name or a class_index in "
            f"0..{len(classes) - 1}."
        )
    return body.class_index, None


def settle(
    session: Session, storage: Storage, user: User, item_id: int, body: ReviewSettle
) -> ReviewItem:
    """Settle the item with a label of source ``review``, or send the image back for another
    read (see the module doc)."""
    item = _own_item(session, user, item_id)
    project = session.get_one(Project, item.project_id)
    now = utcnow()
    if body.send_back:
        queued = session.scalar(
            select(QueueItem)
            .where(QueueItem.image_id == item.image_id)
            .order_by(QueueItem.round_id.desc())
            .limit(1)
        )
        if queued is None:
            raise Conflict(
                f"Image {item.image_id} never came from the queue; settle it instead.",
                code="CannotSendBack",
            )
        queued.labels_needed += 1
        item.state = ReviewState.sent_back.value
    else:
        class_index, mask_key = _settled_content(session, storage, project, item, body)
        label = Label(
            project_id=project.id,
            image_id=item.image_id,
            author_id=user.id,
            author_name=user.name,
            source=LabelSource.review.value,
            class_index=class_index,
            mask_key=mask_key,
            idempotency_key=f"review-{item.id}",
            created_at=now,
        )
        session.add(label)
        session.flush()
        item.state = ReviewState.settled.value
        item.settled_label_id = label.id
    item.settled_by = user.id
    item.settled_at = now
    item.leased_by = None
    item.lease_expires_at = None
    session.add(
        Event(
            project_id=project.id,
            actor_id=user.id,
            kind="review.settled" if not body.send_back else "review.sent_back",
            payload={
                "review_item_id": item.id,
                "image_id": item.image_id,
                "label_id": item.settled_label_id,
            },
        )  # fmt: skip
    )
    session.flush()
    return item


def release(session: Session, user: User, item_id: int, *, skip: bool) -> ReviewItem:
    """Give the item back (``skip``: and never be offered it again)."""
    item = _own_item(session, user, item_id)
    if skip:
        session.merge(ReviewSkip(review_item_id=item.id, user_id=user.id))
    if item.leased_by == user.id:
        item.leased_by = None
        item.lease_expires_at = None
    session.flush()
    return item
