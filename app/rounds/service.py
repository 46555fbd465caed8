"""Active-learning rounds: creation (by an admin or automatically), reading, cancelling.

At most one round per project is queued or running; the partial unique index
``uq_rounds_one_active`` settles races that the first check cannot see. A new round is sent
to the worker by task name only after the request's transaction commits.
"""

from __future__ import annotations

import math

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import call_after_commit
from app.errors import Conflict, InvalidInput, NotFound
from app.jobs import send_round
from app.models import (
    ACTIVE_ROUND_STATUSES,
    AutoRound,
    Event,
    Image,
    Label,
    ModelVersion,
    Project,
    QueueItem,
    Round,
    RoundStatus,
    Split,
    utcnow,
)
from app.queue.service import require_project
from app.rounds.schemas import RoundOut
from app.settings import Settings
from app.warm_start.service import maybe_queue_for_round as maybe_queue_warm_start

_ACTIVE = [status.value for status in ACTIVE_ROUND_STATUSES]
_RUNNING = [RoundStatus.training.value, RoundStatus.scoring.value, RoundStatus.selecting.value]


def _already_active(project_id: int) -> Conflict:
    return Conflict(
        f"Project {project_id} already has a queued or running round; wait for it to finish "
        "or cancel it (POST /rounds/{id}/cancel).",
        code="RoundAlreadyActive",
    )


def resolve_budget(session: Session, project: Project) -> int:
    """Items to select: the project's count, or ceil(fraction x pool images)."""
    if project.budget_count is not None:
        return project.budget_count
    if project.budget_fraction is not None:
        pool = session.scalar(
            select(func.count(Image.id)).where(
                Image.project_id == project.id, Image.split == Split.pool.value
            )
        )
        return math.ceil(project.budget_fraction * (pool or 0))
    raise InvalidInput(
        f"Project {project.id} has neither budget_count nor budget_fraction; set one.",
        code="BudgetNotSet",
    )


def _active_round_id(session: Session, project_id: int) -> int | None:
    return session.scalar(
        select(Round.id).where(Round.project_id == project_id, Round.status.in_(_ACTIVE))
    )


def _insert_round(
    session: Session, settings: Settings, project: Project, requested_by: int | None, auto: bool
) -> Round | None:
    """Insert the next round and send it after the commit; None if another one is active."""
    number = session.scalar(
        select(func.coalesce(func.max(Round.number), -1) + 1).where(Round.project_id == project.id)
    )
    new_round = Round(
        project_id=project.id,
        number=int(number or 0),
        status=RoundStatus.queued.value,
        strategy=project.strategy,
        alpha=project.alpha,
        budget=resolve_budget(session, project),
        progress={},
        metrics={},
        attempt=0,
        cancel_requested=False,
        requested_by=requested_by,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(new_round)
    except IntegrityError:  # uq_rounds_one_active (or the number): a concurrent request won
        return None
    payload = {"round_id": new_round.id, "number": new_round.number, "auto": auto}
    session.add(
        Event(project_id=project.id, actor_id=requested_by, kind="round.created", payload=payload)
    )
    session.flush()
    round_id = new_round.id
    call_after_commit(session, lambda: send_round(settings, round_id))
    maybe_queue_warm_start(session, settings, project)  # with projects.warm_start, once
    return new_round


def create_round(
    session: Session, settings: Settings, project_id: int, requested_by: int | None
) -> Round:
    """Queue the project's next round (409 ``RoundAlreadyActive`` while one is active)."""
    project = require_project(session, project_id)
    if _active_round_id(session, project.id) is not None:
        raise _already_active(project.id)
    new_round = _insert_round(session, settings, project, requested_by, auto=False)
    if new_round is None:
        raise _already_active(project.id)
    return new_round


def _batch_done(session: Session, round_id: int) -> bool:
    """Whether the round selected items and every one of them has all its labels."""
    total, still_open = session.execute(
        select(
            func.count(QueueItem.id),
            func.count(QueueItem.id).filter(QueueItem.labels_needed > 0),
        ).where(QueueItem.round_id == round_id)
    ).one()
    return bool(total) and not still_open


def _labels_since(session: Session, project_id: int, snapshot_id: int | None) -> int:
    stmt = select(func.count(Label.id)).where(Label.project_id == project_id)
    if snapshot_id is not None:
        stmt = stmt.where(Label.id > snapshot_id)
    return int(session.scalar(stmt) or 0)


def maybe_start_auto_round(session: Session, settings: Settings, project: Project) -> Round | None:
    """Start the next round if the project's auto-round rule says it is due.

    ``batch_done``: the newest round is done and all its queue items are fully labeled.
    ``every_n``: at least ``auto_round_every`` labels since the newest round's snapshot (or in
    all, before the first round). Automatic rounds only follow a done round: after a failed
    or cancelled one an admin starts the next by hand.
    """
    if project.auto_round == AutoRound.off.value:
        return None
    latest = session.scalars(
        select(Round).where(Round.project_id == project.id).order_by(Round.number.desc()).limit(1)
    ).first()
    if latest is not None and latest.status != RoundStatus.done.value:
        return None
    if project.auto_round == AutoRound.batch_done.value:
        due = latest is not None and _batch_done(session, latest.id)
    elif project.auto_round == AutoRound.every_n.value and project.auto_round_every:
        snapshot = latest.label_snapshot_id if latest is not None else None
        due = _labels_since(session, project.id, snapshot) >= project.auto_round_every
    else:
        due = False
    if not due:
        return None
    return _insert_round(session, settings, project, None, auto=True)


def get_round(session: Session, round_id: int) -> Round:
    found = session.get(Round, round_id)
    if found is None:
        raise NotFound(f"Round {round_id} does not exist.", code="RoundNotFound")
    return found


def list_rounds(session: Session, project_id: int) -> list[Round]:
    require_project(session, project_id)
    return list(
        session.scalars(
            select(Round).where(Round.project_id == project_id).order_by(Round.number)
        ).all()
    )


def cancel_round(session: Session, round_id: int, actor_id: int | None) -> Round:
    """Queued: cancelled at once. Running: ``cancel_requested`` (the worker stops itself)."""
    target = get_round(session, round_id)
    now = utcnow()
    cancelled = session.execute(
        update(Round)
        .where(Round.id == round_id, Round.status == RoundStatus.queued.value)
        .values(status=RoundStatus.cancelled.value, finished_at=now)
        .returning(Round.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    requested = None
    if cancelled is None:
        requested = session.execute(
            update(Round)
            .where(Round.id == round_id, Round.status.in_(_RUNNING))
            .values(cancel_requested=True)
            .returning(Round.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
    session.refresh(target)
    if cancelled is None and requested is None:
        raise Conflict(
            f"Round {round_id} is {target.status}; only a queued or running round can be "
            "cancelled.",
            code="RoundNotActive",
        )
    kind = "round.cancelled" if cancelled is not None else "round.cancel_requested"
    session.add(
        Event(
            project_id=target.project_id,
            actor_id=actor_id,
            kind=kind,
            payload={"round_id": round_id},
        )
    )
    session.flush()
    return target


def rounds_out(session: Session, rounds: list[Round]) -> list[RoundOut]:
    """Rounds as responses, with their model version ids (one query for all)."""
    ids = [r.id for r in rounds]
    versions: dict[int, int] = {}
    if ids:
        rows = session.execute(
            select(ModelVersion.round_id, ModelVersion.id).where(ModelVersion.round_id.in_(ids))
        ).all()
        versions = {round_id: version_id for round_id, version_id in rows}
    return [_round_out(r, versions.get(r.id)) for r in rounds]


def _round_out(r: Round, model_version_id: int | None) -> RoundOut:
    test = r.metrics.get("test") if isinstance(r.metrics, dict) else None
    return RoundOut(
        id=r.id,
        project_id=r.project_id,
        number=r.number,
        status=r.status,
        strategy=r.strategy,
        alpha=r.alpha,
        budget=r.budget,
        label_snapshot_id=r.label_snapshot_id,
        labeled_count=r.labeled_count,
        progress=r.progress or {},
        metrics=r.metrics or {},
        test_metrics=test if isinstance(test, dict) else None,
        attempt=r.attempt,
        error=r.error,
        cancel_requested=r.cancel_requested,
        model_version_id=model_version_id,
        requested_by=r.requested_by,
        heartbeat_at=r.heartbeat_at,
        created_at=r.created_at,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )
