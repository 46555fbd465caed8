"""The reaper's database side: rounds whose worker died, and rounds that lost their message.

A running round whose heartbeat is older than the timeout goes back to ``queued`` (or to
``failed`` after ``round_max_attempts``); the caller then sends ``round.run`` for it. Each change
is a conditional UPDATE that repeats the staleness test, so a round that beat (or finished)
since it was read is left alone, and two reapers never both re-queue one round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.models import Round, RoundStatus, utcnow
from app.settings import Settings
from worker.records import RUNNING, Sessions, close_round, count_updated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReapResult:
    requeued: list[int]
    failed: list[int]
    resent: list[int]

    @property
    def to_send(self) -> list[int]:
        """Rounds that need a ``round.run`` message (re-queued now or queued without one)."""
        return sorted({*self.requeued, *self.resent})


def reap_rounds(
    sessions: Sessions,
    settings: Settings,
    *,
    timeout_seconds: float,
    max_attempts: int,
    resend_all_queued: bool = False,
    now: datetime | None = None,
) -> ReapResult:
    """Re-queue running rounds whose heartbeat stopped (or fail them after ``max_attempts``),
    and list queued rounds that may have no message.

    A queued round is re-sent when it has waited ``timeout_seconds`` since it was created or
    last (re-)sent (``heartbeat_at`` records the send), or always with ``resend_all_queued``
    (worker start-up: the SQLite transport loses messages of a worker that died). Duplicate
    messages are harmless: only one delivery can claim the round.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_seconds)
    with unit_of_work(sessions) as session:
        stale = session.execute(
            select(Round.id, Round.attempt, Round.heartbeat_at).where(
                Round.status.in_(RUNNING),
                (Round.heartbeat_at.is_(None)) | (Round.heartbeat_at < cutoff),
            )
        ).all()
        requeued, failed = _reap_stale(
            session, settings, stale, cutoff, now, max_attempts, timeout_seconds
        )
        waiting = select(Round.id).where(Round.status == RoundStatus.queued.value)
        if not resend_all_queued:
            waiting = waiting.where(func.coalesce(Round.heartbeat_at, Round.created_at) < cutoff)
        resent = [rid for rid in session.scalars(waiting) if rid not in requeued]
        if resent:
            session.execute(update(Round).where(Round.id.in_(resent)).values(heartbeat_at=now))
    return ReapResult(requeued=requeued, failed=failed, resent=resent)


def _reap_stale(
    session: Session,
    settings: Settings,
    stale: Any,
    cutoff: datetime,
    now: datetime,
    max_attempts: int,
    timeout_seconds: float,
) -> tuple[list[int], list[int]]:
    requeued: list[int] = []
    failed: list[int] = []
    for round_id, attempt, _ in stale:
        still_stale = (
            (Round.id == round_id)
            & (Round.attempt == attempt)
            & Round.status.in_(RUNNING)
            & ((Round.heartbeat_at.is_(None)) | (Round.heartbeat_at < cutoff))
        )
        if attempt >= max_attempts:
            row = session.scalar(select(Round).where(still_stale).with_for_update())
            if row is None:
                continue
            error = (
                f"The worker running this round stopped responding (no heartbeat for "
                f"{timeout_seconds:g} s) on attempt {attempt} of {max_attempts}; giving up. "
                "Check the worker's log (out of memory? killed?) and start a new round."
            )
            close_round(session, settings, row, RoundStatus.failed, now, error=error)
            failed.append(round_id)
            continue
        progress = {"phase": RoundStatus.queued.value, "requeued_after_attempt": attempt}
        requeue = update(Round).where(still_stale)
        values = {"status": RoundStatus.queued.value, "heartbeat_at": now, "progress": progress}
        if count_updated(session, requeue.values(**values)) == 1:
            requeued.append(round_id)
            log.warning("round %s: heartbeat stopped on attempt %s; re-queued", round_id, attempt)
    return requeued, failed
