"""Projects: their configuration rules, and the counts that summarise their state."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.labels.consensus import current_labels
from app.labels.kinds import kind_of
from app.models import Image, Label, Lease, LeaseState, Project, QueueItem, Round, Split, utcnow
from app.projects.schemas import ProjectCounts, ProjectCreate, ProjectUpdate


class ProjectExists(Conflict):
    code = "ProjectExists"


class ProjectNotFound(NotFound):
    code = "ProjectNotFound"


class InvalidProjectConfig(InvalidInput):
    code = "InvalidProjectConfig"


def get_project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise ProjectNotFound(f"No project with id {project_id}; GET /projects lists them.")
    return project


def find_project(session: Session, name_or_id: str) -> Project:
    """A project by exact name, else by numeric id (for the CLI)."""
    project = session.scalar(select(Project).where(Project.name == name_or_id))
    if project is None and name_or_id.isdigit():
        project = session.get(Project, int(name_or_id))
    if project is None:
        raise ProjectNotFound(f"No project named (or with id) {name_or_id!r}.")
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def _checked_classes(task: str, classes: list[str] | None) -> list[str]:
    try:
        return kind_of(task).checked_classes(classes)
    except InvalidInput as exc:
        raise InvalidProjectConfig(exc.detail) from None


def _check_auto_round(project: Project) -> None:
    if project.auto_round == "every_n" and project.auto_round_every is None:
        raise InvalidProjectConfig("auto_round 'every_n' needs auto_round_every (labels, >= 1).")


def _set_budget(project: Project, budget: int | float) -> None:
    if isinstance(budget, int):
        project.budget_count, project.budget_fraction = budget, None
    else:
        project.budget_count, project.budget_fraction = None, budget


def create_project(session: Session, data: ProjectCreate) -> Project:
    classes = _checked_classes(data.task, data.classes)
    if session.scalar(select(Project.id).where(Project.name == data.name)) is not None:
        raise ProjectExists(f"A project named {data.name!r} already exists.")
    values = data.model_dump(exclude={"budget", "classes", "alpha"})
    alpha = data.alpha if data.alpha is not None else kind_of(data.task).default_alpha
    project = Project(**values, classes=classes, alpha=alpha)
    _set_budget(project, data.budget)
    _check_auto_round(project)
    try:
        with session.begin_nested():  # a concurrent insert of the same name loses here
            session.add(project)
            session.flush()
    except IntegrityError as exc:
        raise ProjectExists(f"A project named {data.name!r} already exists.") from exc
    return project


# PATCH fields that may be set to null (the others keep their value when null is sent).
_NULLABLE = {"auto_round_every", "learning_rate", "group_key"}


def update_project(session: Session, project_id: int, data: ProjectUpdate) -> Project:
    """Apply the fields the client sent, then check the merged configuration."""
    project = get_project(session, project_id)
    changes: dict[str, Any] = data.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is None and name not in _NULLABLE:
            raise InvalidProjectConfig(f"{name} cannot be null; leave it out to keep it.")
        if name == "budget":
            _set_budget(project, value)
        else:
            setattr(project, name, value)
    _check_auto_round(project)
    session.flush()
    return project


def _labeled_pool(session: Session, project: Project) -> int:
    """Pool images with a current label: any label with one reader per image; with several,
    those whose reads reached a consensus (``app.labels.consensus``)."""
    if project.overlap >= 2:
        pool = select(Image.id).where(
            Image.project_id == project.id, Image.split == Split.pool.value
        )
        return len(current_labels(session, project, image_ids=session.scalars(pool).all()))
    labeled = session.scalar(
        select(func.count(func.distinct(Label.image_id)))
        .join(Image, Image.id == Label.image_id)
        .where(Label.project_id == project.id, Image.split == Split.pool.value)
    )
    return labeled or 0


def project_counts(session: Session, project: Project) -> ProjectCounts:
    """How many images (per split), labeled pool images, open queue items, leases, rounds."""
    project_id = project.id
    by_split = dict.fromkeys((s.value for s in Split), 0)
    rows = session.execute(
        select(Image.split, func.count())
        .where(Image.project_id == project_id)
        .group_by(Image.split)
    )
    for split, count in rows:
        by_split[split] = count
    labeled = _labeled_pool(session, project)
    queued = session.scalar(
        select(func.count())
        .select_from(QueueItem)
        .where(QueueItem.project_id == project_id, QueueItem.labels_needed > 0)
    )
    leased = session.scalar(
        select(func.count())
        .select_from(Lease)
        .where(
            Lease.project_id == project_id,
            Lease.state == LeaseState.active.value,
            Lease.expires_at > utcnow(),
        )
    )
    rounds = session.scalar(
        select(func.count()).select_from(Round).where(Round.project_id == project_id)
    )
    return ProjectCounts(
        images=by_split,
        labeled=labeled,
        queued=queued or 0,
        leased=leased or 0,
        rounds=rounds or 0,
    )
