"""The warm start's database side (no torch here: ``worker.tasks`` imports it at start-up).

One short transaction per function, as ``worker.records`` for rounds: claim (``queued`` ->
``training``, ``attempt + 1``), heartbeat, progress, the result transaction, failure, give-back,
and the reaper's pass over warm starts. Every write of a run is fenced by ``id``, ``attempt``
and ``status = training``; a run that lost its claim gets :class:`worker.records.LostClaim`.
The run itself is ``worker.pretrain``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.models import RoundStatus, WarmStart, utcnow
from app.settings import Settings
from app.storage import Storage
from app.webhooks.service import record_event
from worker.reaper import ReapResult
from worker.records import LostClaim, RoundSignal, Sessions, count_updated, json_safe

log = logging.getLogger(__name__)

WARM_START_RUN = "warm_start.run"
_TRAINING = RoundStatus.training.value


@dataclass(frozen=True)
class WarmClaim:
    warm_start_id: int
    project_id: int
    attempt: int


def checkpoint_key(project_id: int) -> str:
    """The pretrained backbone (a ResNet-18 state_dict) later rounds load."""
    return f"models/{project_id}/warm-start.pt"


def resume_key(project_id: int) -> str:
    """The resumable pretraining state an interrupted attempt leaves for the next one."""
    return f"models/{project_id}/warm-start.resume.pt"


def _owned(claim: WarmClaim) -> Any:
    return (
        (WarmStart.id == claim.warm_start_id)
        & (WarmStart.attempt == claim.attempt)
        & (WarmStart.status == _TRAINING)
    )


def _fence(session: Session, claim: WarmClaim, **values: Any) -> None:
    values.setdefault("heartbeat_at", utcnow())
    if count_updated(session, update(WarmStart).where(_owned(claim)).values(**values)) != 1:
        raise LostClaim(f"warm start {claim.warm_start_id} attempt {claim.attempt} is not ours")


def _load(session: Session, warm_start_id: int) -> WarmStart:
    statement = select(WarmStart).where(WarmStart.id == warm_start_id)
    return session.execute(statement.execution_options(populate_existing=True)).scalar_one()


def claim_warm_start(
    sessions: Sessions, warm_start_id: int, now: datetime | None = None
) -> WarmClaim | None:
    """``queued`` -> ``training`` with ``attempt + 1``; None when there is nothing to claim."""
    now = now or utcnow()
    queued = (WarmStart.id == warm_start_id) & (WarmStart.status == RoundStatus.queued.value)
    values = {
        "status": _TRAINING,
        "attempt": WarmStart.attempt + 1,
        "heartbeat_at": now,
        "progress": {"phase": _TRAINING, "step": "starting"},
        "error": None,
    }
    with unit_of_work(sessions) as session:
        if count_updated(session, update(WarmStart).where(queued).values(**values)) != 1:
            return None
        row = _load(session, warm_start_id)
        if row.started_at is None:
            row.started_at = now
        return WarmClaim(row.id, row.project_id, row.attempt)


def beat(sessions: Sessions, claim: WarmClaim, *, write: bool = True) -> RoundSignal:
    """Refresh the heartbeat (when ``write``) if still ours; report ownership and cancel."""
    with unit_of_work(sessions) as session:
        if write:
            session.execute(update(WarmStart).where(_owned(claim)).values(heartbeat_at=utcnow()))
        row = session.execute(
            select(WarmStart.status, WarmStart.attempt, WarmStart.cancel_requested).where(
                WarmStart.id == claim.warm_start_id
            )
        ).one()
    owned = row.status == _TRAINING and row.attempt == claim.attempt
    return RoundSignal(owned=owned, cancel_requested=bool(row.cancel_requested))


def set_progress(sessions: Sessions, claim: WarmClaim, progress: dict[str, Any]) -> None:
    with unit_of_work(sessions) as session:
        _fence(session, claim, progress=json_safe(progress))


def _close(
    session: Session,
    settings: Settings,
    row: WarmStart,
    status: RoundStatus,
    now: datetime,
    error: str | None,
) -> None:
    row.status = status.value
    row.error = error
    row.finished_at = now
    row.progress = {**(row.progress or {}), "phase": status.value}
    payload: dict[str, Any] = {"warm_start_id": row.id, "attempt": row.attempt}
    if status is RoundStatus.done:
        payload["checkpoint_sha256"] = row.sha256
    if error:
        payload["error"] = error
    record_event(
        session,
        settings,
        project_id=row.project_id,
        actor_id=None,
        kind=f"warm_start.{status.value}",
        payload=json_safe(payload),
    )


def finish(
    sessions: Sessions,
    settings: Settings,
    claim: WarmClaim,
    key: str,
    sha256: str,
    metrics: dict[str, Any],
) -> str:
    """The one result transaction: ``done`` with the checkpoint and metrics, or ``cancelled``
    when a cancel came in meanwhile. Raises :class:`LostClaim` if no longer ours."""
    now = utcnow()
    with unit_of_work(sessions) as session:
        _fence(session, claim, heartbeat_at=now)
        row = _load(session, claim.warm_start_id)
        if row.cancel_requested:
            _close(session, settings, row, RoundStatus.cancelled, now, None)
            return RoundStatus.cancelled.value
        row.checkpoint_key, row.sha256 = key, sha256
        row.metrics = json_safe(metrics)
        _close(session, settings, row, RoundStatus.done, now, None)
        return RoundStatus.done.value


def end(
    sessions: Sessions,
    settings: Settings,
    claim: WarmClaim,
    status: RoundStatus,
    error: str | None,
) -> bool:
    """Mark the run's warm start ``failed`` or ``cancelled``; False if not ours."""
    now = utcnow()
    with unit_of_work(sessions) as session:
        try:
            _fence(session, claim, heartbeat_at=now)
        except LostClaim:
            return False
        _close(session, settings, _load(session, claim.warm_start_id), status, now, error)
        return True


def release(sessions: Sessions, claim: WarmClaim) -> bool:
    """Give the warm start back (``queued``) before a transient-error retry."""
    with unit_of_work(sessions) as session:
        values = {"status": RoundStatus.queued.value, "heartbeat_at": utcnow(), "progress": {}}
        return count_updated(session, update(WarmStart).where(_owned(claim)).values(**values)) == 1


def reap_warm_starts(
    sessions: Sessions,
    settings: Settings,
    *,
    timeout_seconds: float,
    max_attempts: int,
    resend_all_queued: bool = False,
    now: datetime | None = None,
) -> ReapResult:
    """As :func:`worker.reaper.reap_rounds`, for warm starts: re-queue a running one whose
    heartbeat stopped (``failed`` after ``max_attempts``), list queued ones to re-send."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_seconds)
    stale_beat = (WarmStart.heartbeat_at.is_(None)) | (WarmStart.heartbeat_at < cutoff)
    requeued: list[int] = []
    failed: list[int] = []
    with unit_of_work(sessions) as session:
        stale = session.execute(
            select(WarmStart.id, WarmStart.attempt).where(WarmStart.status == _TRAINING, stale_beat)
        ).all()
        for warm_id, attempt in stale:
            still = (
                (WarmStart.id == warm_id)
                & (WarmStart.attempt == attempt)
                & (WarmStart.status == _TRAINING)
                & stale_beat
            )
            if attempt >= max_attempts:
                row = session.scalar(select(WarmStart).where(still).with_for_update())
                if row is None:
                    continue
                error = (
                    f"The worker running this warm start stopped responding (no heartbeat for "
                    f"{timeout_seconds:g} s) on attempt {attempt} of {max_attempts}; giving up. "
                    "Check the worker's log, then start it again (it resumes from its last "
                    "saved epoch)."
                )
                _close(session, settings, row, RoundStatus.failed, now, error)
                failed.append(warm_id)
                continue
            progress = {"phase": RoundStatus.queued.value, "requeued_after_attempt": attempt}
            values = {"status": RoundStatus.queued.value, "heartbeat_at": now, "progress": progress}
            if count_updated(session, update(WarmStart).where(still).values(**values)) == 1:
                requeued.append(warm_id)
                log.warning("warm start %s: heartbeat stopped on attempt %s", warm_id, attempt)
        waiting = select(WarmStart.id).where(WarmStart.status == RoundStatus.queued.value)
        if not resend_all_queued:
            waiting = waiting.where(
                (WarmStart.heartbeat_at.is_(None) & (WarmStart.created_at < cutoff))
                | (WarmStart.heartbeat_at < cutoff)
            )
        resent = [wid for wid in session.scalars(waiting) if wid not in requeued]
        if resent:
            session.execute(
                update(WarmStart).where(WarmStart.id.in_(resent)).values(heartbeat_at=now)
            )
    return ReapResult(requeued=requeued, failed=failed, resent=resent)


def warm_start_weights_path(sessions: Sessions, storage: Storage, project_id: int) -> str | None:
    """The local path of the project's pretrained backbone when its warm start is done, else
    None (no warm start, or not finished yet)."""
    with unit_of_work(sessions) as session:
        key = session.scalar(
            select(WarmStart.checkpoint_key).where(
                WarmStart.project_id == project_id,
                WarmStart.status == RoundStatus.done.value,
            )
        )
    if key is None or not storage.exists(key):
        return None
    return str(storage.path(key))
