"""A project's self-supervised warm start: start (by an admin, or with the project's first
round when ``projects.warm_start`` is set), read, cancel.

One ``warm_starts`` row per project (unique): it runs once. A failed or cancelled warm start
can be started again (the worker resumes from its last saved epoch); a done one cannot. The job
is sent to the worker by task name (``warm_start.run``, training queue) after the commit.
"""

from __future__ import annotations

import logging

from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db import call_after_commit
from app.errors import Conflict, NotFound
from app.jobs import TRAINING_QUEUE, producer
from app.models import Event, Project, RoundStatus, WarmStart, utcnow
from app.queue.service import require_project
from app.settings import Settings
from app.warm_start.schemas import WarmStartOut

log = logging.getLogger(__name__)

WARM_START_RUN = "warm_start.run"
_RUNNING = [RoundStatus.training.value]
_RESTARTABLE = [RoundStatus.failed.value, RoundStatus.cancelled.value]


def send_warm_start(settings: Settings, warm_start_id: int) -> None:
    """Ask the worker to run the warm start; an unreachable broker is logged (the row stays
    ``queued`` and the worker's reaper re-sends it)."""
    broker_url = settings.broker_url or ""
    try:
        producer(broker_url).send_task(WARM_START_RUN, args=[warm_start_id], queue=TRAINING_QUEUE)
    except OperationalError:
        log.exception(
            "could not send warm start %s to the broker %s",
            warm_start_id,
            maybe_sanitize_url(broker_url),
        )


def find_warm_start(session: Session, project_id: int) -> WarmStart | None:
    return session.scalar(select(WarmStart).where(WarmStart.project_id == project_id))


def get_warm_start(session: Session, project_id: int) -> WarmStart:
    require_project(session, project_id)
    found = find_warm_start(session, project_id)
    if found is None:
        raise NotFound(
            f"Project {project_id} has no warm start; POST /projects/{project_id}/warm-start "
            "starts one.",
            code="WarmStartNotFound",
        )
    return found


def _queue(
    session: Session, settings: Settings, project_id: int, requested_by: int | None, auto: bool
) -> WarmStart | None:
    """Insert the project's warm start, queued, and send it after the commit; None if a
    concurrent request inserted it first."""
    row = WarmStart(
        project_id=project_id,
        status=RoundStatus.queued.value,
        progress={},
        metrics={},
        attempt=0,
        cancel_requested=False,
        requested_by=requested_by,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:  # uq_warm_starts_project_id: a concurrent request won
        return None
    _created(session, settings, row, requested_by, auto)
    return row


def _created(
    session: Session, settings: Settings, row: WarmStart, actor: int | None, auto: bool
) -> None:
    payload = {"warm_start_id": row.id, "auto": auto}
    session.add(
        Event(project_id=row.project_id, actor_id=actor, kind="warm_start.queued", payload=payload)
    )
    session.flush()
    warm_start_id = row.id
    call_after_commit(session, lambda: send_warm_start(settings, warm_start_id))


def _conflict(row: WarmStart) -> Conflict:
    if row.status == RoundStatus.done.value:
        return Conflict(
            f"Project {row.project_id}'s warm start is done; it runs once per project.",
            code="WarmStartDone",
        )
    return Conflict(
        f"Project {row.project_id}'s warm start is already {row.status}; cancel it "
        f"(POST /projects/{row.project_id}/warm-start/cancel) or wait for it.",
        code="WarmStartActive",
    )


def start_warm_start(
    session: Session, settings: Settings, project_id: int, requested_by: int | None
) -> WarmStart:
    """Queue the project's warm start, or re-queue a failed or cancelled one (it resumes from
    its last saved epoch). 409 ``WarmStartActive`` while queued or running, ``WarmStartDone``
    once done."""
    require_project(session, project_id)
    row = find_warm_start(session, project_id)
    if row is None:
        created = _queue(session, settings, project_id, requested_by, auto=False)
        if created is not None:
            return created
        row = find_warm_start(session, project_id)
        assert row is not None
        raise _conflict(row)
    requeued = session.execute(
        update(WarmStart)
        .where(WarmStart.id == row.id, WarmStart.status.in_(_RESTARTABLE))
        .values(
            status=RoundStatus.queued.value,
            cancel_requested=False,
            error=None,
            progress={},
            requested_by=requested_by,
            heartbeat_at=None,
            finished_at=None,
            created_at=utcnow(),
        )
        .returning(WarmStart.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    session.refresh(row)
    if requeued is None:
        raise _conflict(row)
    _created(session, settings, row, requested_by, auto=False)
    return row


def maybe_queue_for_round(session: Session, settings: Settings, project: Project) -> None:
    """With ``project.warm_start`` set: queue the project's warm start if it has none yet
    (called when a round is created, so it runs before the first trained round)."""
    if project.warm_start and find_warm_start(session, project.id) is None:
        _queue(session, settings, project.id, None, auto=True)


def cancel_warm_start(session: Session, project_id: int, actor_id: int | None) -> WarmStart:
    """Queued: cancelled at once. Running: ``cancel_requested`` (the worker stops between
    batches and keeps its last saved epoch for a restart)."""
    row = get_warm_start(session, project_id)
    cancelled = session.execute(
        update(WarmStart)
        .where(WarmStart.id == row.id, WarmStart.status == RoundStatus.queued.value)
        .values(status=RoundStatus.cancelled.value, finished_at=utcnow())
        .returning(WarmStart.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    requested = None
    if cancelled is None:
        requested = session.execute(
            update(WarmStart)
            .where(WarmStart.id == row.id, WarmStart.status.in_(_RUNNING))
            .values(cancel_requested=True)
            .returning(WarmStart.id)
            .execution_options(synchronize_session=False)
        ).scalar_one_or_none()
    session.refresh(row)
    if cancelled is None and requested is None:
        raise Conflict(
            f"Project {project_id}'s warm start is {row.status}; only a queued or running one "
            "can be cancelled.",
            code="WarmStartNotActive",
        )
    kind = "warm_start.cancelled" if cancelled is not None else "warm_start.cancel_requested"
    session.add(
        Event(
            project_id=project_id, actor_id=actor_id, kind=kind, payload={"warm_start_id": row.id}
        )
    )
    session.flush()
    return row


def warm_start_out(row: WarmStart) -> WarmStartOut:
    return WarmStartOut(
        id=row.id,
        project_id=row.project_id,
        status=row.status,
        progress=row.progress or {},
        metrics=row.metrics or {},
        attempt=row.attempt,
        error=row.error,
        cancel_requested=row.cancel_requested,
        checkpoint_key=row.checkpoint_key,
        checkpoint_sha256=row.sha256,
        requested_by=row.requested_by,
        heartbeat_at=row.heartbeat_at,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )
