"""The worker's database side: claim, heartbeat, progress, model version, finalize, reap.

Every function here is one short transaction (``app.db.unit_of_work``); the round runner holds
no transaction while it trains or scores. Ownership of a running round is fenced by its
``attempt`` number: the claim increments it, and every later write of that run matches
``id``, ``attempt`` and a running status. So once the reaper has re-queued a round (its
heartbeat stopped) or a user cancelled it, a late write of the old run changes nothing and
raises :class:`LostClaim` instead. ``finalize_round`` is the one transaction that makes a
round's results visible (queue items, predictions, status ``done``, the event), and it can
commit at most once per round: its first statement is the fenced status update.
The reaper's side is ``worker/reaper.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.models import (
    Label,
    ModelVersion,
    Prediction,
    Project,
    QueueItem,
    Round,
    RoundStatus,
    utcnow,
)
from app.settings import Settings
from app.webhooks.service import record_event

log = logging.getLogger(__name__)

Sessions = sessionmaker[Session]
RUNNING = (RoundStatus.training.value, RoundStatus.scoring.value, RoundStatus.selecting.value)


class LostClaim(Exception):
    """The round is no longer this run's: re-queued by the reaper, cancelled, or finished."""


@dataclass(frozen=True)
class Claim:
    """What a run knows about the round it claimed (plain values, no ORM object)."""

    round_id: int
    project_id: int
    number: int
    attempt: int
    strategy: str
    alpha: float
    budget: int
    label_snapshot_id: int
    labeled_count: int


@dataclass(frozen=True)
class RoundSignal:
    """What the heartbeat learnt: ``owned`` False once the round is no longer this run's."""

    owned: bool
    cancel_requested: bool


@dataclass(frozen=True)
class QueueEntry:
    image_id: int
    min_distance: float | None
    predicted_loss: float | None
    score: float | None


@dataclass(frozen=True)
class PredictionEntry:
    image_id: int
    class_probs: list[float] | None
    mask_key: str | None
    predicted_loss: float | None


@dataclass
class RoundResult:
    """Everything ``finalize_round`` records; files (checkpoint, masks) already exist."""

    queue: list[QueueEntry]
    predictions: list[PredictionEntry]
    metrics: dict[str, Any]
    model_version_id: int | None = None
    progress: dict[str, Any] = field(default_factory=dict)


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def count_updated(session: Session, statement: Executable) -> int:
    """Run an UPDATE; returns how many rows it changed."""
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


def _owned(claim: Claim) -> Any:
    """The WHERE clause that fences a run's writes to its own attempt."""
    return (
        (Round.id == claim.round_id) & (Round.attempt == claim.attempt) & Round.status.in_(RUNNING)
    )


def _event(
    session: Session, settings: Settings, project_id: int, kind: str, payload: dict[str, Any]
) -> None:
    """Record an event and fan it out to the project's webhooks (sent after the commit)."""
    record_event(
        session,
        settings,
        project_id=project_id,
        actor_id=None,
        kind=kind,
        payload=json_safe(payload),
    )


def _fence(session: Session, claim: Claim, **values: Any) -> None:
    """Update the round if it is still this run's (and lock its row); else :class:`LostClaim`."""
    values.setdefault("heartbeat_at", utcnow())
    if count_updated(session, update(Round).where(_owned(claim)).values(**values)) != 1:
        raise LostClaim(f"round {claim.round_id} attempt {claim.attempt} is no longer ours")


def _load_round(session: Session, round_id: int) -> Round:
    statement = select(Round).where(Round.id == round_id)
    return session.execute(statement.execution_options(populate_existing=True)).scalar_one()


def claim_round(sessions: Sessions, round_id: int, now: datetime | None = None) -> Claim | None:
    """``queued`` -> ``training`` with ``attempt + 1``; None when there is nothing to claim.

    The label snapshot (max label id of the project) is fixed at the first claim and kept by
    later attempts, so a re-run after a crash trains on the same labels.
    """
    now = now or utcnow()
    claim = (Round.id == round_id) & (Round.status == RoundStatus.queued.value)
    values = {
        "status": RoundStatus.training.value,
        "attempt": Round.attempt + 1,
        "heartbeat_at": now,
        "progress": {"phase": RoundStatus.training.value, "step": "starting"},
        "error": None,
    }
    with unit_of_work(sessions) as session:
        if count_updated(session, update(Round).where(claim).values(**values)) != 1:
            return None
        row = _load_round(session, round_id)
        if row.started_at is None:
            row.started_at = now
        if row.label_snapshot_id is None:
            snapshot = session.scalar(
                select(func.max(Label.id)).where(Label.project_id == row.project_id)
            )
            row.label_snapshot_id = int(snapshot or 0)
        return Claim(
            round_id=row.id,
            project_id=row.project_id,
            number=row.number,
            attempt=row.attempt,
            strategy=row.strategy,
            alpha=row.alpha,
            budget=row.budget,
            label_snapshot_id=row.label_snapshot_id,
            labeled_count=row.labeled_count or 0,
        )


def record_labeled_count(sessions: Sessions, claim: Claim, labeled_count: int) -> Claim:
    """Store how many pool images the snapshot labels (the x axis of the learning curve)."""
    with unit_of_work(sessions) as session:
        _fence(session, claim, labeled_count=labeled_count)
    return replace(claim, labeled_count=labeled_count)


def beat(sessions: Sessions, claim: Claim, *, write: bool = True) -> RoundSignal:
    """Refresh ``heartbeat_at`` (when ``write``) if the round is still ours; report whether it
    is and whether a cancel was requested."""
    with unit_of_work(sessions) as session:
        if write:
            session.execute(update(Round).where(_owned(claim)).values(heartbeat_at=utcnow()))
        row = session.execute(
            select(Round.status, Round.attempt, Round.cancel_requested).where(
                Round.id == claim.round_id
            )
        ).one()
    owned = row.status in RUNNING and row.attempt == claim.attempt
    return RoundSignal(owned=owned, cancel_requested=bool(row.cancel_requested))


def set_progress(
    sessions: Sessions, claim: Claim, progress: dict[str, Any], status: str | None = None
) -> None:
    """Write the progress JSON (and the phase, when ``status`` is given); also a heartbeat."""
    values: dict[str, Any] = {"progress": json_safe(progress)}
    if status is not None:
        values["status"] = status
    with unit_of_work(sessions) as session:
        _fence(session, claim, **values)


def save_model_version(
    sessions: Sessions, claim: Claim, checkpoint_key: str, sha256: str, metrics: dict[str, Any]
) -> int:
    """Insert the round's model version, or replace the one an earlier attempt left.

    Called after the checkpoint file exists. One model version per round (unique round_id):
    a re-run updates the row in place, so its id (used in prediction keys) is stable.
    """
    with unit_of_work(sessions) as session:
        _fence(session, claim)
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.round_id == claim.round_id)
        )
        if version is None:
            version = ModelVersion(project_id=claim.project_id, round_id=claim.round_id)
            session.add(version)
        version.checkpoint_key = checkpoint_key
        version.sha256 = sha256
        version.metrics = json_safe(metrics)
        version.created_at = utcnow()
        session.flush()
        return version.id


def _insert_results(session: Session, claim: Claim, result: RoundResult) -> int:
    """Queue items (rank = pick order) and predictions; returns the number of queue items.

    The fenced status update before this makes a second finalize impossible; rows already
    present (which only a bug could leave) are kept rather than duplicated.
    """
    overlap = session.scalar(select(Project.overlap).where(Project.id == claim.project_id))
    existing = session.scalar(
        select(func.count()).select_from(QueueItem).where(QueueItem.round_id == claim.round_id)
    )
    if not existing:
        session.add_all(
            QueueItem(
                project_id=claim.project_id,
                image_id=entry.image_id,
                round_id=claim.round_id,
                rank=rank,
                min_distance=json_safe(entry.min_distance),
                predicted_loss=json_safe(entry.predicted_loss),
                score=json_safe(entry.score),
                labels_needed=int(overlap or 1),
            )
            for rank, entry in enumerate(result.queue)
        )
    if result.model_version_id is not None:
        session.execute(
            delete(Prediction).where(Prediction.model_version_id == result.model_version_id)
        )
        session.add_all(
            Prediction(
                model_version_id=result.model_version_id,
                image_id=p.image_id,
                class_probs=p.class_probs,
                mask_key=p.mask_key,
                predicted_loss=json_safe(p.predicted_loss),
            )
            for p in result.predictions
        )
    session.flush()
    return int(existing or len(result.queue))


def finalize_round(
    sessions: Sessions, settings: Settings, claim: Claim, result: RoundResult
) -> str:
    """The round's one result transaction: queue items, predictions, model version metrics,
    status ``done`` and the ``round.done`` event, all or nothing.

    Returns the final status: ``done``, or ``cancelled`` when a cancel was requested meanwhile.
    Raises :class:`LostClaim` when the round is no longer this run's (nothing is written).
    """
    now = utcnow()
    with unit_of_work(sessions) as session:
        _fence(session, claim, heartbeat_at=now)
        row = _load_round(session, claim.round_id)
        if row.cancel_requested:
            close_round(session, settings, row, RoundStatus.cancelled, now, error=None)
            return RoundStatus.cancelled.value
        queued = _insert_results(session, claim, result)
        if result.model_version_id is not None:
            version = session.get(ModelVersion, result.model_version_id)
            if version is not None:
                version.metrics = json_safe({**version.metrics, **result.metrics})
        row.metrics = json_safe(result.metrics)
        row.progress = json_safe({**result.progress, "phase": RoundStatus.done.value})
        close_round(session, settings, row, RoundStatus.done, now, error=None, queued=queued)
        return RoundStatus.done.value


def close_round(
    session: Session,
    settings: Settings,
    row: Round,
    status: RoundStatus,
    now: datetime,
    *,
    error: str | None,
    queued: int = 0,
) -> None:
    """Set a final status on a round this transaction holds, with its event."""
    row.status = status.value
    row.error = error
    row.finished_at = now
    if status is not RoundStatus.done:
        row.progress = {**(row.progress or {}), "phase": status.value}
    version_id = session.scalar(select(ModelVersion.id).where(ModelVersion.round_id == row.id))
    payload: dict[str, Any] = {
        "round_id": row.id,
        "number": row.number,
        "attempt": row.attempt,
        "model_version_id": version_id,
    }
    if status is RoundStatus.done:
        payload.update(queued=queued, labeled_count=row.labeled_count, test=row.metrics.get("test"))
    if error:
        payload["error"] = error
    _event(session, settings, row.project_id, f"round.{status.value}", payload)
    if status is RoundStatus.done and version_id is not None:
        version = session.get(ModelVersion, version_id)
        assert version is not None
        published = {
            "model_version_id": version_id,
            "round_id": row.id,
            "number": row.number,
            "checkpoint_sha256": version.sha256,
            "test": row.metrics.get("test"),
        }
        _event(session, settings, row.project_id, "model.published", published)


def end_round(
    sessions: Sessions, settings: Settings, claim: Claim, status: RoundStatus, error: str | None
) -> bool:
    """Mark a run's round ``failed`` (with ``error``) or ``cancelled``; False if not ours."""
    now = utcnow()
    with unit_of_work(sessions) as session:
        try:
            _fence(session, claim, heartbeat_at=now)
        except LostClaim:
            return False
        row = _load_round(session, claim.round_id)
        close_round(session, settings, row, status, now, error=error)
        return True


def release_round(sessions: Sessions, claim: Claim) -> bool:
    """Give a claimed round back (``queued``) before a transient-error retry; False if not ours."""
    with unit_of_work(sessions) as session:
        requeue = update(Round).where(_owned(claim))
        values = {"status": RoundStatus.queued.value, "heartbeat_at": utcnow(), "progress": {}}
        return count_updated(session, requeue.values(**values)) == 1
