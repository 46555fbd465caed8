"""Labels: validated against the project, append-only, idempotent, counted towards the queue.

A newer label of an image supersedes the older ones; nothing is overwritten. A retry with the
same idempotency key returns the first label and stores nothing. Keys are per author: another
user's label under the same key is neither returned nor in the way. A label counts towards a
queue item (``labels_needed`` goes down by one) once per distinct annotator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from itertools import chain
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Table,
    Update,
    bindparam,
    exists,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.dbapi_rows import fetch_rows
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.labels.kinds import Submission, kind_of
from app.labels.masks import (
    Mask,
    decode_png_mask,
    decode_rle_mask,
    encode_png_mask,
    store_mask,
)
from app.labels.schemas import LabelCreate, LabelOut
from app.members.service import checked_annotator, member_role, reads_filter, sees_all_reads
from app.models import (
    AutoRound,
    Event,
    Image,
    Label,
    LabelSource,
    Lease,
    LeaseState,
    Project,
    ProjectMember,
    QueueItem,
    Role,
    User,
    utcnow,
)
from app.queue.service import LOCK_ITEM_OF_LEASE, require_project
from app.review.service import ImageFacts, check_image
from app.rounds.service import maybe_start_auto_round
from app.settings import Settings
from app.storage import Storage
from app.webhooks.models import WebhookSubscription
from app.webhooks.service import fan_out

# Statements of the hot path, built once (building one costs more than running it), run on the
# session's connection (Core), so that no ORM bookkeeping runs for rows nobody reads back.
_labels, _leases, _items, _events = (
    cast(Table, model.__table__) for model in (Label, Lease, QueueItem, Event)
)
_ACTIVE, _DONE = LeaseState.active.value, LeaseState.done.value
# Keys are the author's own: another user's label under the same key is no replay.
_BY_KEY = select(Label.id).where(
    Label.author_id == bindparam("user_id"), Label.idempotency_key == bindparam("key")
)
_TARGET = (
    select(
        Image.id,
        Image.height,
        Image.width,
        Project.id,
        Project.task,
        Project.classes,
        Project.require_lease,
        Project.auto_round,
        Project.overlap,
        Project.review_sample,
        Project.mask_agreement,
        # Whether fan_out may have anything to do (most projects have no webhook).
        exists()
        .where(
            WebhookSubscription.project_id == Project.id,
            WebhookSubscription.active.is_(true()),
        )
        .label("has_webhooks"),
        # The author's role in the project (None: not a member; app.members.service).
        select(ProjectMember.role)
        .where(
            ProjectMember.project_id == Project.id,
            ProjectMember.user_id == bindparam("user_id"),
        )
        .scalar_subquery()
        .label("member_role"),
        # The author's label under the request's idempotency key, if any (a retry): read with
        # the target, one round trip instead of two (_BY_KEY alone when the image is unknown).
        _BY_KEY.scalar_subquery().label("label_under_key"),
        # PostgreSQL: waits for and locks the queue item of the request's lease, if any, in the
        # same round trip (the lease itself is read after, in a new statement: _LEASE).
        LOCK_ITEM_OF_LEASE.scalar_subquery().label("locked_item"),
    )
    .join(Project, Project.id == Image.project_id)
    .where(Image.id == bindparam("image_id"))
)
_CLASSES = select(Project.classes).where(Project.id == bindparam("project_id"))
_LEASE = select(
    Lease.id, Lease.queue_item_id, Lease.image_id, Lease.user_id, Lease.state, Lease.expires_at
).where(Lease.id == bindparam("lease_id"))
# A repeated idempotency key of the same author inserts nothing (and returns no id), also when
# the first label commits concurrently: no savepoint needed around the insert.
_KEY_OF_AUTHOR = [_labels.c.author_id, _labels.c.idempotency_key]
_INSERT_LABEL = {
    "postgresql": postgresql.insert(_labels)
    .on_conflict_do_nothing(index_elements=_KEY_OF_AUTHOR)
    .returning(_labels.c.id),
    "sqlite": sqlite.insert(_labels)
    .on_conflict_do_nothing(index_elements=_KEY_OF_AUTHOR)
    .returning(_labels.c.id),
}
# The label's event, its values as named parameters (``event_<column>``), as in _LABEL_WITH_LEASE
# (whose UPDATEs would take parameters named after columns as SET clauses).
_EVENT_COLUMNS = ("project_id", "actor_id", "kind", "payload", "created_at")
_INSERT_EVENT = (
    insert(_events)
    .values({c: bindparam(f"event_{c}", type_=_events.c[c].type) for c in _EVENT_COLUMNS})
    .returning(_events.c.id)
)
_OPEN_ITEMS_OF_IMAGE = (
    select(QueueItem.id)
    .where(QueueItem.image_id == bindparam("p_image_id"), QueueItem.labels_needed > 0)
    .order_by(QueueItem.id)
    .with_for_update(key_share=True)
)
_CLOSE_LEASE = (
    update(_leases)
    .where(_leases.c.id == bindparam("p_lease_id"), _leases.c.state == _ACTIVE)
    .values(state=_DONE, updated_at=bindparam("now"))
)
_CLOSE_CALLERS_LEASES = (  # the caller's own leases on the image, answered by a lease-less label
    update(_leases)
    .where(
        _leases.c.image_id == bindparam("p_image_id"),
        _leases.c.user_id == bindparam("p_user_id"),
        _leases.c.state == _ACTIVE,
    )
    .values(state=_DONE, updated_at=bindparam("now"))
)


# Decrement labels_needed unless the author labeled the image since the item exists (once per
# distinct annotator). The item row is locked by then, so a concurrent label of the same author
# has committed before this statement's snapshot.
def _count_once_per_author(item_id: ColumnElement[Any], label_id: ColumnElement[Any]) -> Update:
    return (
        update(_items)
        .where(
            _items.c.id == item_id,
            _items.c.labels_needed > literal_column("0"),
            ~exists().where(
                _labels.c.image_id == bindparam("p_image_id"),
                _labels.c.author_id == bindparam("p_author_id"),
                _labels.c.id != label_id,
                _labels.c.created_at >= _items.c.created_at,
            ),
        )
        .values(labels_needed=_items.c.labels_needed - 1)
    )


_COUNT_ONCE_PER_AUTHOR = _count_once_per_author(bindparam("item_id"), bindparam("label_id"))


def _label_event_payload(label_id: Any, image_id: Any, lease_id: Any) -> dict[str, Any]:
    """The payload of a ``label.created`` event (values, or SQL expressions to build it from)."""
    return {"label_id": label_id, "image_id": image_id, "lease_id": lease_id}


# PostgreSQL, a label with a lease: ONE statement after the item's lock (_TARGET), one round trip
# instead of three. It reads the lease (as _LEASE would: after the lock, so current), inserts the
# label with it, and, driven by the inserted label (nothing when the key's label exists already),
# closes the lease, counts the label and adds its event: data-modifying CTEs, run once each
# whether or not anything reads them, on one snapshot (the label inserted here is not in it, as
# _COUNT_ONCE_PER_AUTHOR wants). The lease is checked after it ran, in Python (_lease_checked): a
# bad one raises, and the transaction, label and all, rolls back. Parameters are named after no
# column of these tables: an UPDATE in a CTE would take such a parameter as a SET clause.
# SQLite has no data-modifying CTEs: there the steps run one by one (_checked_lease,
# _INSERT_LABEL, _count_and_log), the same statements with parameters where these read the CTEs.
_LABEL_VALUES = (
    "project_id", "image_id", "author_id", "author_name", "source", "class_index", "mask_key",
    "idempotency_key", "created_at",
)  # fmt: skip
_lease = _LEASE.cte("lease")
_new_label = (
    postgresql.insert(_labels)
    .from_select(
        [*_LABEL_VALUES, "lease_id"],
        select(
            *(bindparam(f"label_{c}", type_=_labels.c[c].type) for c in _LABEL_VALUES),
            _lease.c.id,
        ),
    )
    .on_conflict_do_nothing(index_elements=_KEY_OF_AUTHOR)
    .returning(_labels.c.id)
    .cte("new_label")
)
_new_label_id = select(_new_label.c.id).scalar_subquery()
_labeled = exists(select(_new_label.c.id))
_event = (
    insert(_events)
    .from_select(
        list(_EVENT_COLUMNS),
        select(
            *(
                func.json_build_object(
                    *chain.from_iterable(
                        (literal(key), value)
                        for key, value in _label_event_payload(
                            _new_label.c.id,
                            bindparam("p_image_id", type_=Integer()),
                            bindparam("p_lease_id", type_=Integer()),
                        ).items()
                    ),
                    type_=_events.c.payload.type,
                )
                if c == "payload"
                else bindparam(f"event_{c}", type_=_events.c[c].type)
                for c in _EVENT_COLUMNS
            )
        ).select_from(_new_label),
    )
    .returning(_events.c.id)
    .cte("event")
)
_LABEL_WITH_LEASE = select(
    *_lease.c,
    _new_label_id.label("label_id"),
    select(_event.c.id).scalar_subquery().label("event_id"),
).add_cte(
    _CLOSE_LEASE.where(_labeled).cte("closed"),
    _count_once_per_author(select(_lease.c.queue_item_id).scalar_subquery(), _new_label_id)
    .where(_labeled)
    .cte("counted"),
)


@dataclass(frozen=True)
class _Target:
    """The image to label and what its project checks a label against."""

    image_id: int
    height: int
    width: int
    project_id: int
    task: str
    classes: list[Any]
    require_lease: bool
    auto_round: str
    overlap: int
    review_sample: float
    mask_agreement: float
    has_webhooks: bool
    member_role: str | None


@dataclass(frozen=True)
class _LeaseRow:
    id: int
    queue_item_id: int
    image_id: int
    user_id: int
    state: str
    expires_at: datetime


def create_label(
    session: Session,
    settings: Settings,
    storage: Storage,
    user: User,
    data: LabelCreate,
    mask_png: bytes | None = None,
    source: LabelSource = LabelSource.human,
) -> tuple[Label, bool]:
    """Store a label; returns ``(label, created)`` (``created`` False for an idempotent retry).

    ``source`` records where it came from (a person here, an import, Label Studio).
    """
    label, created, _ = _create_label(session, settings, storage, user, data, mask_png, source)
    return label, created


def submit_label(
    session: Session,
    settings: Settings,
    storage: Storage,
    user: User,
    data: LabelCreate,
    mask_png: bytes | None = None,
    mask: PreparedMask | None = None,
) -> tuple[LabelOut, bool]:
    """:func:`create_label` for POST /labels: the label as returned by the API, and created.

    ``mask``: the mask of ``data``/``mask_png`` already decoded (and encoded for storage) by
    :func:`prepare_submitted_mask` before the transaction began, so that neither happens while
    the write lock is held.
    """
    decoded, png = (mask.mask, mask.png) if mask is not None else (None, None)
    label, created, classes = _create_label(
        session, settings, storage, user, data, mask_png, decoded=decoded, png=png
    )
    if classes is None:
        return label_response(session, label), created
    return label_out(label, classes), created


def _create_label(
    session: Session,
    settings: Settings,
    storage: Storage,
    user: User,
    data: LabelCreate,
    mask_png: bytes | None = None,
    source: LabelSource = LabelSource.human,
    decoded: Mask | None = None,
    png: bytes | None = None,
) -> tuple[Label, bool, list[Any] | None]:
    """:func:`create_label`, and the project's classes when the label is new.

    ``decoded``: the mask, decoded already; ``png``: that mask as stored (encoded already).
    """
    conn = session.connection()
    params = {
        "image_id": data.image_id,
        "user_id": user.id,
        "key": data.idempotency_key,
        "lease_id": data.lease_id,
    }
    row = next(iter(fetch_rows(conn, _TARGET, params)), None)
    existing_id = row.label_under_key if row is not None else conn.scalar(_BY_KEY, params)
    existing = None if existing_id is None else session.get(Label, existing_id)
    if existing is not None:  # a retry: checked against the label it repeats
        replay = _replayed(conn, storage, existing, user, data, mask_png, decoded)
        return replay, False, None
    target = _checked_target(row, data.image_id, user)
    class_index, mask = _validated_content(target, data, mask_png, decoded)
    # PostgreSQL, a label with a lease: the lease is read and checked by the one statement that
    # writes the label (_LABEL_WITH_LEASE); elsewhere before anything is written.
    in_one = data.lease_id is not None and conn.dialect.name == "postgresql"
    lease = None if in_one else _checked_lease(conn, target, user, data.lease_id)
    mask_key: str | None = None
    if mask is not None:  # deleted again if the transaction rolls back (a bad lease, say)
        stored_png = png if mask is decoded else None
        mask_key = store_mask(session, storage, target.project_id, mask, stored_png)
    values = {
        "project_id": target.project_id,
        "image_id": target.image_id,
        "author_id": user.id,
        "author_name": user.name,
        "source": LabelSource(source).value,
        "class_index": class_index,
        "mask_key": mask_key,
        "lease_id": data.lease_id,
        "idempotency_key": data.idempotency_key,
        "created_at": utcnow(),
    }
    event_id: int | None = None
    if in_one:
        lease, label_id, event_id = _insert_label_with_lease(conn, target, user, values)
    else:
        label_id = conn.execute(_INSERT_LABEL[conn.dialect.name], values).scalar_one_or_none()
    if label_id is None:  # the same key, committed by a concurrent request meanwhile
        if mask_key is not None:
            storage.delete(mask_key)
        existing = _by_key(session, conn, user, data.idempotency_key)
        if existing is None:  # cannot happen: the key's label exists once the insert skipped
            raise Conflict(f"Idempotency key {data.idempotency_key!r} is being used; retry.")
        return _replayed(conn, storage, existing, user, data, mask_png, mask), False, None
    label = Label(id=label_id, **values)  # detached: the row is written, nothing to track
    if event_id is None:
        event_id = _count_and_log(conn, target.image_id, user, lease, label)
    if target.overlap >= 2:  # several readers: do the reads now disagree? (the review queue)
        facts = ImageFacts(
            target.project_id, target.image_id, target.task, target.height, target.width,
            target.overlap, target.review_sample, target.mask_agreement,
        )  # fmt: skip
        check_image(session, storage, facts)
    if target.has_webhooks:
        fan_out(
            session,
            settings,
            event_id=event_id,
            project_id=target.project_id,
            kind="label.created",
        )
    if target.auto_round != AutoRound.off.value:
        maybe_start_auto_round(session, settings, require_project(session, target.project_id))
    return label, True, target.classes


def _checked_target(row: Any, image_id: int, user: User) -> _Target:
    """The image a label is for (``row`` of ``_TARGET``), if ``user`` may read it (an annotator
    member, or an admin)."""
    if row is None or (row.member_role is None and user.role != Role.admin):
        raise NotFound(f"Image {image_id} does not exist.", code="ImageNotFound")
    target = _Target(*row[: len(fields(_Target))])
    checked_annotator(user, target.project_id, target.member_role)
    return target


def _by_key(session: Session, conn: Connection, user: User, key: str) -> Label | None:
    """The caller's own label under ``key`` (never another user's)."""
    label_id = conn.scalar(_BY_KEY, {"user_id": user.id, "key": key})
    return None if label_id is None else session.get(Label, label_id)


def _replayed(
    conn: Connection,
    storage: Storage,
    existing: Label,
    user: User,
    data: LabelCreate,
    mask_png: bytes | None,
    decoded: Mask | None,
) -> Label:
    """``existing``, the label stored under the key, if ``data`` is a retry of it (the same
    payload); a different payload under the same key is refused, never silently dropped."""
    if existing.author_id != user.id or existing.image_id != data.image_id:
        raise Conflict(
            f"Idempotency key {data.idempotency_key!r} was used for another label; "
            "use a new key for a new label.",
            code="IdempotencyKeyReused",
        )
    if not _same_payload(conn, storage, existing, data, mask_png, decoded):
        raise Conflict(
            f"Idempotency key {data.idempotency_key!r} was used for label {existing.id} with "
            "a different payload; a retry sends the same body. Send a correction under a new "
            "key.",
            code="IdempotencyKeyReused",
        )
    return existing


_IMAGE_SIZE = select(Image.height, Image.width).where(Image.id == bindparam("image_id"))


def _same_payload(
    conn: Connection,
    storage: Storage,
    existing: Label,
    data: LabelCreate,
    mask_png: bytes | None,
    decoded: Mask | None,
) -> bool:
    """Whether ``data`` (with ``mask_png``/``decoded``) asks for what ``existing`` holds: the
    same lease, and the same class (by index or name) or the same mask, pixel for pixel."""
    if data.lease_id != existing.lease_id:
        return False
    has_class = data.class_index is not None or data.class_name is not None
    has_mask = data.mask_rle is not None or mask_png is not None
    if existing.mask_key is None:
        index = existing.class_index
        if has_mask or not has_class or index is None:
            return False
        if data.class_index is not None and data.class_index != index:
            return False
        if data.class_name is not None:
            classes = conn.scalar(_CLASSES, {"project_id": existing.project_id}) or []
            if not 0 <= index < len(classes) or str(classes[index]) != data.class_name:
                return False
        return True
    if has_class or not has_mask:
        return False
    height, width = conn.execute(_IMAGE_SIZE, {"image_id": existing.image_id}).one()
    if decoded is None:  # the retry's mask, unless decoded already (before the transaction)
        if mask_png is not None:
            decoded = decode_png_mask(mask_png, (height, width))
        else:
            assert data.mask_rle is not None
            decoded = decode_rle_mask(data.mask_rle, (height, width))
    stored = decode_png_mask(storage.read_bytes(existing.mask_key), (height, width))
    return decoded.shape == stored.shape and bool((decoded == stored).all())


def _validated_content(
    target: _Target, data: LabelCreate, mask_png: bytes | None, decoded: Mask | None = None
) -> tuple[int | None, Mask | None]:
    """The class index or the decoded mask, as the project's label kind checks them.

    ``decoded``: the mask, already decoded (see :func:`prepare_submitted_mask`).
    """
    if data.mask_rle is not None and mask_png is not None:
        raise InvalidInput("Send the mask once: a PNG file or mask_rle, not both.")
    submitted = Submission(
        project_id=target.project_id,
        classes=target.classes,
        height=target.height,
        width=target.width,
        class_index=data.class_index,
        class_name=data.class_name,
        mask_rle=data.mask_rle,
        mask_png=mask_png,
        decoded=decoded,
    )
    content = kind_of(target.task).content(submitted)
    return content.class_index, content.mask


_MASK_TARGET = (
    select(Image.height, Image.width, Project.task)
    .join(Project, Project.id == Image.project_id)
    .where(Image.id == bindparam("image_id"))
)


@dataclass(frozen=True)
class PreparedMask:
    """A submitted mask, decoded and checked, and encoded as it will be stored."""

    mask: Mask
    png: bytes


def prepare_submitted_mask(
    sessions: sessionmaker[Session], data: LabelCreate, mask_png: bytes | None
) -> PreparedMask | None:
    """The mask of a POST /labels body, decoded and checked against its image's size (and
    encoded as the PNG to store) BEFORE the request's transaction begins (blocking: call it in
    a worker thread).

    Decoding (and encoding) a large mask takes a while; inside the transaction it would hold
    SQLite's write lock (``BEGIN IMMEDIATE``) all that time and block every other writer.
    The image's size is
    read in a short read-only session (on SQLite a deferred transaction, which neither takes nor
    waits for the write lock). None when there is nothing to decode here (no mask, no such
    image, not a segmentation project, both a PNG and an RLE): the transaction then refuses
    the body as before.
    """
    if (data.mask_rle is None) == (mask_png is None):
        return None
    with sessions() as session:
        # Read-only on an engine (see app.db); a test's session joins its connection as is.
        read_only = {"read_only": True} if isinstance(session.get_bind(), Engine) else None
        conn = session.connection(execution_options=read_only)
        row = conn.execute(_MASK_TARGET, {"image_id": data.image_id}).first()
    if row is None or not kind_of(row.task).takes_mask:
        return None
    expected = (row.height, row.width)
    if mask_png is not None:
        mask = decode_png_mask(mask_png, expected)
    else:
        assert data.mask_rle is not None
        mask = decode_rle_mask(data.mask_rle, expected)
    return PreparedMask(mask, encode_png_mask(mask))


def _checked_lease(
    conn: Connection, target: _Target, user: User, lease_id: int | None
) -> _LeaseRow | None:
    """The caller's lease for this image, read after its queue item was locked (by _TARGET's
    ``locked_item``, earlier in the transaction); None when none is given."""
    if lease_id is None:
        if target.require_lease:
            raise Forbidden(
                f"Project {target.project_id} accepts labels only for leased items; take the image "
                "from GET /queue and send its lease_id.",
                code="LeaseRequired",
            )
        return None
    row = conn.execute(_LEASE, {"lease_id": lease_id}).first()  # read under the item's lock
    return _lease_checked(row, target, user, lease_id)


def _lease_checked(
    row: Sequence[Any] | None, target: _Target, user: User, lease_id: int
) -> _LeaseRow:
    """The lease of ``row`` (``_LEASE``'s columns first), if it is the caller's for this image
    and still takes a label (active and unexpired, or done: a correction of the caller's own
    answer)."""
    if row is None:
        raise NotFound(f"Lease {lease_id} does not exist.", code="LeaseNotFound")
    lease = _LeaseRow(*row[: len(fields(_LeaseRow))])
    if lease.user_id != user.id:
        raise Forbidden(f"Lease {lease_id} belongs to another annotator.", code="LeaseNotYours")
    if lease.image_id != target.image_id:
        raise Forbidden(
            f"Lease {lease_id} is for image {lease.image_id}, not image {target.image_id}.",
            code="LeaseMismatch",
        )
    if lease.state == LeaseState.done.value:  # a correction of the caller's own answer
        return lease
    if lease.state != LeaseState.active.value:
        raise Conflict(
            f"Lease {lease_id} is {lease.state}; fetch the item again from GET /queue.",
            code="LeaseNotActive",
        )
    if lease.expires_at <= utcnow():
        raise Conflict(
            f"Lease {lease_id} expired at {lease.expires_at.isoformat()}; fetch the item "
            "again from GET /queue.",
            code="LeaseExpired",
        )
    return lease


def _event_params(project_id: int, user: User, created_at: datetime) -> dict[str, Any]:
    """The parameters of a ``label.created`` event, but its payload."""
    return {
        "event_project_id": project_id,
        "event_actor_id": user.id,
        "event_kind": "label.created",
        "event_created_at": created_at,
    }


def _insert_label_with_lease(
    conn: Connection, target: _Target, user: User, values: dict[str, Any]
) -> tuple[_LeaseRow, int | None, int | None]:
    """PostgreSQL: :data:`_LABEL_WITH_LEASE`, the label of ``values`` with its lease; returns the
    lease, and the label's and its event's ids (None and None: the key's label exists already).

    Raises as :func:`_checked_lease` for a bad lease, after the statement ran: the request's
    transaction then rolls back what it wrote."""
    lease_id, now = values["lease_id"], values["created_at"]
    params = {
        **{f"label_{column}": values[column] for column in _LABEL_VALUES},
        **_event_params(target.project_id, user, now),
        "lease_id": lease_id,
        "p_lease_id": lease_id,
        "p_image_id": target.image_id,
        "p_author_id": user.id,
        "now": now,
    }
    row = next(iter(fetch_rows(conn, _LABEL_WITH_LEASE, params)), None)
    lease = _lease_checked(row, target, user, lease_id)
    assert row is not None  # _lease_checked raised otherwise
    return lease, row.label_id, row.event_id


def _count_and_log(
    conn: Connection, image_id: int, user: User, lease: _LeaseRow | None, label: Label
) -> int:
    """Close the caller's lease(s) on the image, count the label once per distinct author, and
    add its ``label.created`` event; returns the event's id. (PostgreSQL does all this for a
    label with a lease in the statement that inserts it: :data:`_LABEL_WITH_LEASE`.)"""
    params = {"now": label.created_at, "p_image_id": image_id, "p_user_id": user.id}
    event = {
        **_event_params(label.project_id, user, label.created_at),
        "event_payload": _label_event_payload(label.id, image_id, label.lease_id),
    }
    if lease is not None:
        item_ids = [lease.queue_item_id]
        conn.execute(_CLOSE_LEASE, {**params, "p_lease_id": lease.id})
    else:
        item_ids = list(conn.scalars(_OPEN_ITEMS_OF_IMAGE, params).all())
        conn.execute(_CLOSE_CALLERS_LEASES, params)
    for item_id in item_ids:
        count = {"item_id": item_id, "p_author_id": user.id, "label_id": label.id}
        conn.execute(_COUNT_ONCE_PER_AUTHOR, {**params, **count})
    return int(conn.execute(_INSERT_EVENT, event).scalar_one())


def list_image_labels(session: Session, user: User, image_id: int) -> list[LabelOut]:
    """The image's label history as ``user`` may see it, newest first: every read, or with
    blind reads (``app.members.service``) an annotator's own."""
    image = session.get(Image, image_id)
    if image is None:
        raise NotFound(f"Image {image_id} does not exist.", code="ImageNotFound")
    project = require_project(session, image.project_id)
    author_id = reads_filter(session, user, project)
    query = select(Label).where(Label.image_id == image_id)
    if author_id is not None:
        query = query.where(Label.author_id == author_id)
    labels = session.scalars(query.order_by(Label.id.desc())).all()
    return [label_out(label, project.classes) for label in labels]


def get_label(session: Session, user: User, label_id: int) -> Label:
    """A label ``user`` may see: in a project they reach, and with blind reads their own (any
    other is answered 404, as if it did not exist)."""
    label = session.get(Label, label_id)
    if label is not None and label.author_id != user.id:
        role = member_role(session, user, label.project_id)
        project = require_project(session, label.project_id)
        if role is None or not sees_all_reads(role, project):
            label = None
    if label is None:
        raise NotFound(f"Label {label_id} does not exist.", code="LabelNotFound")
    return label


def label_mask_key(session: Session, user: User, label_id: int) -> str:
    label = get_label(session, user, label_id)
    if label.mask_key is None:
        raise NotFound(f"Label {label_id} is a class label; it has no mask.", code="MaskNotFound")
    return label.mask_key


def label_response(session: Session, label: Label) -> LabelOut:
    """``label`` as returned by the API (with its class name)."""
    classes = session.scalar(_CLASSES, {"project_id": label.project_id}) or []
    return label_out(label, classes)


def label_out(label: Label, classes: list[Any]) -> LabelOut:
    index = label.class_index
    return LabelOut(
        id=label.id,
        project_id=label.project_id,
        image_id=label.image_id,
        author_id=label.author_id,
        author_name=label.author_name,
        source=label.source,
        class_index=index,
        class_name=str(classes[index]) if index is not None and 0 <= index < len(classes) else None,
        mask_url=f"/labels/{label.id}/mask" if label.mask_key else None,
        lease_id=label.lease_id,
        idempotency_key=label.idempotency_key,
        created_at=label.created_at,
    )
