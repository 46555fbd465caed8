"""The annotation queue: atomic leasing of queue items and the lease lifecycle.

An item may be leased while ``labels_needed`` exceeds its active, unexpired leases; expired
leases free their slot by themselves (no reaper). Leasing is atomic:

- PostgreSQL: candidate items are locked with ``FOR NO KEY UPDATE SKIP LOCKED`` (concurrent
  callers take different items instead of waiting), then their leases are counted again in a
  new statement. The recount matters: under READ COMMITTED the first statement's snapshot may
  predate a lease committed by the transaction that held the lock a moment ago.
- SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (``app.db``), one writer at a time.

Every path that adds weight to an item (leasing, renewing, labeling with a lease) locks the
item row first; the paths that free a slot (release, skip, expiry) need no lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.orm import Session

from app.dbapi_rows import fetch_rows
from app.errors import Conflict, Forbidden, NotFound
from app.members.service import checked_annotator, require_member
from app.models import (
    Image,
    Label,
    Lease,
    LeaseState,
    ModelVersion,
    Prediction,
    Project,
    ProjectMember,
    QueueItem,
    Round,
    User,
    UTCDateTime,
    utcnow,
)
from app.queue.schemas import PredictionOut, QueueEntry, Scores
from app.settings import Settings

# Candidate batches tried before answering with fewer items than asked (but at least one: see
# _lease_new_items).
_MAX_PASSES = 4
_ACTIVE, _DONE, _SKIPPED = (
    LeaseState.active.value,
    LeaseState.done.value,
    LeaseState.skipped.value,
)

# Leasing runs on every GET /queue, so its statements are built once, with bound parameters,
# and read plain rows: building a statement and loading ORM objects cost more than the query.
_now = bindparam("now", type_=UTCDateTime())
_user_id = bindparam("user_id", type_=Integer())
_project_id = bindparam("project_id", type_=Integer())
_ITEM_COLUMNS = (
    QueueItem.id,
    QueueItem.image_id,
    QueueItem.rank,
    QueueItem.labels_needed,
    QueueItem.min_distance,
    QueueItem.predicted_loss,
    QueueItem.score,
    Round.number,
)

_LATEST_MODEL = (
    select(func.max(ModelVersion.id))
    .where(ModelVersion.project_id == _project_id)
    .scalar_subquery()
)
_PROJECT = select(
    Project.lease_ttl_seconds,
    _LATEST_MODEL,
    select(ProjectMember.role)
    .where(ProjectMember.project_id == _project_id, ProjectMember.user_id == _user_id)
    .scalar_subquery(),
).where(Project.id == _project_id)

_HELD = (
    select(Lease.id, Lease.expires_at, *_ITEM_COLUMNS)
    .join(QueueItem, QueueItem.id == Lease.queue_item_id)
    .join(Round, Round.id == QueueItem.round_id)
    .where(
        Lease.user_id == _user_id,
        Lease.state == _ACTIVE,
        Lease.project_id == _project_id,
        Lease.expires_at > _now,
    )
    .order_by(QueueItem.round_id, QueueItem.rank)
    .limit(bindparam("limit"))
)

# An item with a slot free: fewer active, unexpired leases than the labels it still needs.
_HAS_A_FREE_SLOT = (
    QueueItem.labels_needed
    > select(func.count(Lease.id))
    .where(Lease.queue_item_id == QueueItem.id, Lease.state == _ACTIVE, Lease.expires_at > _now)
    .scalar_subquery()
)
_NOT_THE_CALLERS = ~exists().where(  # held, answered or skipped by the caller
    Lease.queue_item_id == QueueItem.id,
    Lease.user_id == _user_id,
    or_(
        Lease.state.in_((_DONE, _SKIPPED)),
        and_(Lease.state == _ACTIVE, Lease.expires_at > _now),
    ),
)
_QUEUE_ORDER = (QueueItem.round_id, QueueItem.rank)


def _candidates(
    *conditions: ColumnElement[bool], limit: ColumnElement[Any]
) -> Select[*tuple[Any, ...]]:
    """Items that look free in the statement's snapshot, in queue order, locked (and skipped when
    another transaction holds them). Round ids grow with round numbers, so (round_id, rank) is
    the queue order; the partial index ix_queue_items_open (migration 0003) holds only the items
    still open."""
    return (
        select(*_ITEM_COLUMNS)
        .join(Round, Round.id == QueueItem.round_id)
        .where(
            QueueItem.project_id == _project_id,
            # A literal, not a parameter, so that the planner may use ix_queue_items_open.
            QueueItem.labels_needed > literal_column("0"),
            _HAS_A_FREE_SLOT,
            _NOT_THE_CALLERS,
            ~exists().where(Label.image_id == QueueItem.image_id, Label.author_id == _user_id),
            *conditions,
        )
        .order_by(*_QUEUE_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True, of=QueueItem)
    )


# A later pass's candidates: ``n`` more, none of those seen by earlier passes.
_CANDIDATES = _candidates(
    QueueItem.id.not_in(bindparam("seen", expanding=True)), limit=bindparam("n")
)

# The first statement of GET /queue, one round trip: the project's row, the caller's held
# leases and the first pass's candidates, locked (as many as the held leases leave of
# ``limit``), each with the latest model's prediction for its image, if any. A row per held
# lease and per candidate (a candidate's lease columns NULL), the project's columns on each;
# one row with all else NULL when there is neither; none when the project does not exist. The
# candidates are locked before the caller's membership is checked: a refused caller's
# transaction rolls back, and their locks go with it.
_held = _HELD.cte("held")
_first = _candidates(
    limit=bindparam("limit") - select(func.count()).select_from(_held).scalar_subquery()
).cte("first_candidates")
_leasable = union_all(
    select(*_held.c),
    select(null().label("id"), null().label("expires_at"), *_first.c),
).subquery("leasable")
_PREDICTION_COLUMNS = (Prediction.id, Prediction.class_probs, Prediction.mask_key)
_PROJECT_HELD_AND_CANDIDATES = (
    select(*_PROJECT.selected_columns, *_leasable.c, *_PREDICTION_COLUMNS)
    .select_from(Project)
    .outerjoin(_leasable, true())
    .outerjoin(  # one at most: unique per (model version, image)
        Prediction,
        and_(
            Prediction.image_id == _leasable.c.image_id,
            Prediction.model_version_id == _LATEST_MODEL,
        ),
    )
    .where(Project.id == _project_id)
)

# A lease on each locked candidate that, counted again in this new statement, still has a free
# slot and is not the caller's, the first ``n`` in queue order. Counted again because under
# READ COMMITTED (PostgreSQL) the candidates' snapshot may predate a lease committed by the
# transaction that held an item's lock a moment ago; a SQLite transaction holds the database's
# write lock from its first statement, so there it changes nothing. One statement, the count
# and the insert: one round trip.
_leases = cast(Table, Lease.__table__)
_LEASE_IF_STILL_FREE = insert(_leases).from_select(
    ["queue_item_id", "project_id", "image_id", "user_id", "state", "expires_at", "created_at",
     "updated_at"],
    select(
        QueueItem.id,
        QueueItem.project_id,
        QueueItem.image_id,
        _user_id,
        literal(_ACTIVE),
        bindparam("expires_at", type_=UTCDateTime()),
        _now,
        _now,
    )
    .where(
        QueueItem.id.in_(bindparam("item_ids", expanding=True)),
        _HAS_A_FREE_SLOT,
        _NOT_THE_CALLERS,
    )
    .order_by(*_QUEUE_ORDER)
    .limit(bindparam("n")),
).returning(_leases.c.id, _leases.c.queue_item_id)  # fmt: skip

_PREDICTIONS = select(
    Prediction.image_id, Prediction.id, Prediction.class_probs, Prediction.mask_key
).where(
    Prediction.model_version_id == bindparam("model_version_id"),
    Prediction.image_id.in_(bindparam("image_ids", expanding=True)),
)

# The queue item of a lease, locked (PostgreSQL; SQLite renders it without FOR UPDATE, a plain
# read). Also a scalar subquery of the label's first read (app.labels.service._TARGET).
LOCK_ITEM_OF_LEASE = (
    select(QueueItem.id)
    .where(
        QueueItem.id
        == select(Lease.queue_item_id).where(Lease.id == bindparam("lease_id")).scalar_subquery()
    )
    .with_for_update(key_share=True)
)


@dataclass(frozen=True)
class _Item:
    """A queue item as leasing sees it (the columns of ``_ITEM_COLUMNS``)."""

    id: int
    image_id: int
    rank: int
    labels_needed: int
    min_distance: float | None
    predicted_loss: float | None
    score: float | None
    round_number: int


@dataclass(frozen=True)
class _Leased:
    lease_id: int
    expires_at: datetime
    item: _Item


def require_project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"Project {project_id} does not exist.", code="ProjectNotFound")
    return project


def lock_lease_item(session: Session, lease_id: int) -> None:
    """Wait for and lock the queue item of lease ``lease_id``.

    PostgreSQL row lock; on SQLite the transaction already holds the database's write lock
    (taken here, by starting the transaction), so there is nothing to run.
    Read the lease itself after this: its state and expiry are then current.
    """
    conn = session.connection()
    if conn.dialect.name != "sqlite":
        conn.execute(LOCK_ITEM_OF_LEASE, {"lease_id": lease_id})


def lease_next_items(
    session: Session, settings: Settings, user: User, project_id: int, limit: int
) -> list[QueueEntry]:
    """The caller's active leases, then new leases in (round, rank) order, ``limit`` in all."""
    conn = session.connection()  # Core: plain rows, no ORM bookkeeping (nothing to flush)
    limit = max(1, min(limit, settings.queue_max_limit))
    params = {"project_id": project_id, "user_id": user.id, "now": utcnow()}
    rows = fetch_rows(conn, _PROJECT_HELD_AND_CANDIDATES, {**params, "limit": limit})
    if not rows:
        raise NotFound(f"Project {project_id} does not exist.", code="ProjectNotFound")
    ttl, model_version_id, member_role = rows[0][:3]
    checked_annotator(user, project_id, member_role)
    held, first, predictions = [], [], {}
    for row in rows:
        lease_id, expires_at = row[3:5]
        item_columns, (prediction_id, probs, mask_key) = row[5:-3], row[-3:]
        if item_columns[0] is None:  # neither held leases nor candidates
            continue
        item = _Item(*item_columns)
        if lease_id is not None:
            held.append(_Leased(lease_id, expires_at, item))
        else:
            first.append(item)
        if prediction_id is not None:
            predictions[item.image_id] = _prediction(
                model_version_id, prediction_id, probs, mask_key
            )
    held.sort(key=lambda leased: _queue_order(leased.item))  # a join keeps no order of its own
    wanted = limit - len(held)
    new = _lease_new_items(conn, params, ttl, wanted, first) if wanted > 0 else []
    leased = held + new
    # Only items found by a later pass (the first pass's were lost to other annotators) still
    # need their predictions read.
    read = {item.id for item in first}
    later = [leased.item.image_id for leased in new if leased.item.id not in read]
    predictions.update(_predictions(conn, model_version_id, later))
    return [_entry(entry, predictions.get(entry.item.image_id)) for entry in leased]


def _queue_order(item: _Item) -> tuple[int, int]:
    """Queue order: round numbers grow with round ids, so (round number, rank) sorts as
    (round_id, rank) does."""
    return item.round_number, item.rank


def _lease_new_items(
    conn: Connection, params: dict[str, Any], ttl: int, wanted: int, first: list[_Item]
) -> list[_Leased]:
    """Lease up to ``wanted`` new items (``params``: project_id, user_id, now), starting with the
    first pass's candidates, ``first`` (locked by the statement that read them).

    Under contention (PostgreSQL) a locked candidate may turn out taken when counted again:
    another transaction leased it a moment ago. The next pass looks past it. After
    ``_MAX_PASSES`` passes this answers with what it has, but it never gives up with nothing
    while there are candidates: an empty answer says that no item is free for the caller (the
    annotator's page shows "All done for now"). Each pass looks at items no earlier pass saw,
    and each one lost went to another annotator, so the passes end.
    """
    expires_at = params["now"] + timedelta(seconds=ttl)
    leased: list[_Leased] = []
    seen: list[int] = []
    passes = 0
    while len(leased) < wanted and (passes < _MAX_PASSES or not leased):
        passes += 1
        missing = wanted - len(leased)
        if passes == 1:
            found = sorted(first, key=_queue_order)
        else:
            rows = fetch_rows(conn, _CANDIDATES, {**params, "n": missing, "seen": seen})
            found = [_Item(*row) for row in rows]
        candidates = {item.id: item for item in found}
        if not candidates:
            break
        seen += candidates
        order = {item_id: i for i, item_id in enumerate(candidates)}
        returned = fetch_rows(
            conn,
            _LEASE_IF_STILL_FREE,
            {**params, "item_ids": list(candidates), "n": missing, "expires_at": expires_at},
        )
        new = sorted(returned, key=lambda row: order[row.queue_item_id])  # RETURNING's order: none
        leased += [_Leased(lease_id, expires_at, candidates[item_id]) for lease_id, item_id in new]
    return leased


def _predictions(
    conn: Connection, model_version_id: int | None, image_ids: list[int]
) -> dict[int, PredictionOut]:
    """The model version's predictions for ``image_ids`` (none before the first model)."""
    if model_version_id is None or not image_ids:
        return {}
    params = {"model_version_id": model_version_id, "image_ids": image_ids}
    return {
        image_id: _prediction(model_version_id, prediction_id, probs, mask_key)
        for image_id, prediction_id, probs, mask_key in conn.execute(_PREDICTIONS, params)
    }


def _prediction(
    model_version_id: int, prediction_id: int, probs: Any, mask_key: str | None
) -> PredictionOut:
    return PredictionOut(
        model_version_id=model_version_id,
        class_probs=probs,
        mask_url=f"/predictions/{prediction_id}/mask" if mask_key else None,
    )


def _entry(leased: _Leased, prediction: PredictionOut | None) -> QueueEntry:
    item = leased.item
    return QueueEntry(
        lease_id=leased.lease_id,
        queue_item_id=item.id,
        image_id=item.image_id,
        image_url=f"/images/{item.image_id}/file",
        round=item.round_number,
        rank=item.rank,
        scores=Scores(
            min_distance=item.min_distance, predicted_loss=item.predicted_loss, score=item.score
        ),
        expires_at=leased.expires_at,
        prediction=prediction,
    )


def _own_lease(session: Session, user: User, lease_id: int) -> Lease:
    lease = session.get(Lease, lease_id, populate_existing=True)
    if lease is None:
        raise NotFound(f"Lease {lease_id} does not exist.", code="LeaseNotFound")
    if lease.user_id != user.id:
        raise Forbidden(f"Lease {lease_id} belongs to another annotator.", code="LeaseNotYours")
    require_member(session, user, lease.project_id)  # a removed member's leases are over
    return lease


def _not_active(lease: Lease) -> Conflict:
    return Conflict(
        f"Lease {lease.id} is {lease.state}, not active; fetch new items from GET /queue.",
        code="LeaseNotActive",
    )


def renew_lease(session: Session, user: User, lease_id: int) -> Lease:
    """Extend an active, unexpired lease by the project's TTL from now."""
    lock_lease_item(session, lease_id)
    lease = _own_lease(session, user, lease_id)
    now = utcnow()
    if lease.state != LeaseState.active.value:
        raise _not_active(lease)
    if lease.expires_at <= now:
        raise Conflict(
            f"Lease {lease.id} expired at {lease.expires_at.isoformat()}; "
            "fetch the item again from GET /queue.",
            code="LeaseExpired",
        )
    project = require_project(session, lease.project_id)
    lease.expires_at = now + timedelta(seconds=project.lease_ttl_seconds)
    lease.updated_at = now
    session.flush()
    return lease


def release_lease(session: Session, user: User, lease_id: int) -> Lease:
    """Give the item back (it may be offered to the caller again). Idempotent."""
    return _end_lease(session, user, lease_id, LeaseState.released, (LeaseState.active,))


def skip_lease(session: Session, user: User, lease_id: int) -> Lease:
    """Give the item back and never offer it to the caller again. Idempotent."""
    allowed = (LeaseState.active, LeaseState.released)
    return _end_lease(session, user, lease_id, LeaseState.skipped, allowed)


def _end_lease(
    session: Session,
    user: User,
    lease_id: int,
    target: LeaseState,
    allowed_from: tuple[LeaseState, ...],
) -> Lease:
    """Move the lease to ``target`` with a conditional UPDATE (a concurrent label wins)."""
    lease = _own_lease(session, user, lease_id)
    if lease.state == target.value:
        return lease
    changed = session.execute(
        update(Lease)
        .where(Lease.id == lease.id, Lease.state.in_([state.value for state in allowed_from]))
        .values(state=target.value, updated_at=utcnow())
        .returning(Lease.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.refresh(lease)
    if changed is None and lease.state != target.value:
        raise _not_active(lease)
    return lease


def prediction_mask_key(session: Session, user: User, prediction_id: int) -> str:
    """The stored mask of a prediction, for a member of its project."""
    prediction = session.get(Prediction, prediction_id)
    if prediction is None or prediction.mask_key is None:
        raise NotFound(
            f"Prediction {prediction_id} does not exist or has no mask.",
            code="PredictionNotFound",
        )
    project_id = session.scalar(select(Image.project_id).where(Image.id == prediction.image_id))
    require_member(session, user, project_id or 0)
    return prediction.mask_key
