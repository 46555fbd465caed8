"""Coreloop as a Label Studio ML backend: model versions, predictions, annotations.

Everything here answers from stored rows (Label Studio gives ``/setup`` 3 s and ``/health``
1 s): nothing is computed by a model in a request.

- **Tasks and images.** A task is a coreloop image when its ``data.coreloop_image_id`` is an
  image id, or when a value of its ``data`` (``data.image`` first) is one of coreloop's own
  ``/images/{id}/file`` URLs, absolute or relative. Files uploaded to Label Studio
  (``/data/upload/...``) are not coreloop images: import them into coreloop first and point the
  tasks at them (fetching them from Label Studio inside a request would blow its timeouts).
  Unmapped tasks get an empty prediction and their annotations are ignored.
- **Which project.** ``/ls/projects/{id}/...`` names it; on plain ``/ls``, ``/setup`` takes
  ``extra_params.coreloop_project_id`` or else the only project; ``/predict`` uses each
  image's own project.
- **Model version.** ``coreloop-<project id>-r<round number>`` of the project's newest model
  version (``coreloop-<project id>-untrained`` before the first); ``/setup`` and ``/predict``
  give the same string, so Label Studio asks again exactly when a round brings a new model.
- **Score** in [0, 1] (Label Studio refuses others), LOWEST first in its uncertainty sampling:
  an image with an open queue item (labels still needed) scores ``0.5 * rank / batch size``
  of that item's round, in [0, 0.5), so Label Studio follows coreloop's confident-coreset pick
  order; any other image scores ``0.5 + 0.5 * confidence``, in [0.5, 1], confidence being
  ``1 / (1 + predicted loss)`` (or the top class probability without a predicted loss), so
  the least certain come next; 1.0 without a prediction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.integrations.labelstudio.rle import decode_mask, encode_mask
from app.integrations.labelstudio.schemas import (
    LsAnnotation,
    LsAnnotationEvent,
    LsControl,
    LsLabelConfig,
    LsPrediction,
    LsPredictRequest,
    LsPredictResponse,
    LsSetupRequest,
    LsSetupResponse,
    LsWebhookAck,
    as_id,
)
from app.labels.kinds import kind_of
from app.labels.masks import decode_png_mask, mask_to_rle
from app.labels.schemas import LabelCreate, RleMask
from app.labels.service import create_label
from app.members.service import require_ls_reach
from app.models import (
    Image,
    LabelSource,
    ModelVersion,
    Prediction,
    Project,
    QueueItem,
    Role,
    Round,
    User,
)
from app.queue.service import require_project
from app.settings import Settings
from app.storage import Storage

log = logging.getLogger(__name__)

PROJECT_PARAM = "coreloop_project_id"
NO_PREDICTION_SCORE = 1.0
BATCH_SHARE = 0.5  # open batch items score in [0, 0.5), the rest in [0.5, 1]
_CHUNK = 500
T = TypeVar("T")


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


@dataclass(frozen=True)
class _Version:
    id: int | None  # None before the project's first model version
    name: str  # coreloop-<project>-r<round>, what Label Studio compares


def newest_versions(session: Session, project_ids: Sequence[int]) -> dict[int, _Version]:
    """Each project's newest model version (``-untrained`` and no id before the first)."""
    found = {pid: _Version(None, f"coreloop-{pid}-untrained") for pid in project_ids}
    newest = (
        select(func.max(ModelVersion.id))
        .where(ModelVersion.project_id.in_(list(found) or [-1]))
        .group_by(ModelVersion.project_id)
    )
    rows = session.execute(
        select(ModelVersion.project_id, ModelVersion.id, Round.number)
        .join(Round, Round.id == ModelVersion.round_id)
        .where(ModelVersion.id.in_(newest))
    ).all()
    found.update({pid: _Version(vid, f"coreloop-{pid}-r{number}") for pid, vid, number in rows})
    return found


def resolve_setup_project(
    session: Session, path_project_id: int | None, extra: dict[str, Any] | None
) -> Project:
    """The project of a ``/setup``: from the URL, ``extra_params``, or the only project."""
    if path_project_id is not None:
        return require_project(session, path_project_id)
    given = (extra or {}).get(PROJECT_PARAM)
    if given is not None:
        project_id = as_id(given)
        if project_id is None:
            raise InvalidInput(f"extra_params.{PROJECT_PARAM} must be a project id, not {given!r}.")
        return require_project(session, project_id)
    ids = session.scalars(select(Project.id).order_by(Project.id).limit(2)).all()
    if len(ids) == 1:
        return require_project(session, ids[0])
    raise InvalidInput(
        "Cannot tell which coreloop project this Label Studio project is: connect the ML "
        "backend as <coreloop>/ls/projects/<project id>, or set its extra_params to "
        f'{{"{PROJECT_PARAM}": <project id>}}.',
        code="ProjectUnresolved",
    )


def _expected_control(project: Project) -> str:
    return kind_of(project.task).ls_control


def check_label_config(project: Project, config: LsLabelConfig) -> None:
    """Refuse a labeling config coreloop cannot fill in or read back for ``project``."""
    problem = config.mismatch(_expected_control(project), [str(c) for c in project.classes])
    if problem is not None:
        raise InvalidInput(
            f"Coreloop project {project.id} ({project.task}): {problem}.",
            code="LabelConfigMismatch",
        )


def setup(
    session: Session,
    path_project_id: int | None,
    request: LsSetupRequest,
    caller: User | None = None,
) -> LsSetupResponse:
    project = resolve_setup_project(session, path_project_id, request.extra_params)
    require_ls_reach(session, caller, project.id)
    if request.label_schema and request.label_schema.strip():
        check_label_config(project, LsLabelConfig.parse(request.label_schema))
    return LsSetupResponse(model_version=newest_versions(session, [project.id])[project.id].name)


@dataclass(frozen=True)
class _Known:
    """The stored facts of one task's image: everything ``/predict`` answers from."""

    image: Image
    project: Project
    version: str
    prediction: Prediction | None
    queue_position: tuple[int, int] | None  # (rank, batch size) of its open queue item


def _images(session: Session, ids: Sequence[int]) -> dict[int, Image]:
    found: dict[int, Image] = {}
    for chunk in _chunks(sorted(set(ids))):
        found.update((i.id, i) for i in session.scalars(select(Image).where(Image.id.in_(chunk))))
    return found


def _predictions(
    session: Session, images: dict[int, Image], versions: dict[int, _Version]
) -> dict[int, Prediction]:
    """Each image's prediction by its project's newest model version."""
    wanted = {pid: v.id for pid, v in versions.items() if v.id is not None}
    found: dict[int, Prediction] = {}
    for chunk in _chunks(sorted(images)):
        rows = session.scalars(
            select(Prediction).where(
                Prediction.image_id.in_(chunk),
                Prediction.model_version_id.in_(list(wanted.values()) or [-1]),
            )
        )
        for row in rows:
            if wanted.get(images[row.image_id].project_id) == row.model_version_id:
                found[row.image_id] = row
    return found


def _queue_positions(session: Session, image_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(rank, batch size) of each image's first open queue item, in queue order."""
    first: dict[int, tuple[int, int]] = {}
    for chunk in _chunks(sorted(set(image_ids))):
        rows = session.execute(
            select(QueueItem.image_id, QueueItem.round_id, QueueItem.rank)
            .where(QueueItem.image_id.in_(chunk), QueueItem.labels_needed > 0)
            .order_by(QueueItem.round_id, QueueItem.rank)
        ).all()
        for image_id, round_id, rank in rows:
            first.setdefault(image_id, (round_id, rank))
    round_ids = sorted({round_id for round_id, _ in first.values()})
    sizes = dict(
        session.execute(
            select(QueueItem.round_id, func.count(QueueItem.id))
            .where(QueueItem.round_id.in_(round_ids or [-1]))
            .group_by(QueueItem.round_id)
        ).all()
    )
    return {image_id: (rank, sizes[rid]) for image_id, (rid, rank) in first.items()}


def _known_images(
    session: Session, image_ids: Sequence[int], path_project_id: int | None
) -> dict[int, _Known]:
    images = _images(session, image_ids)
    if path_project_id is not None:
        images = {i: img for i, img in images.items() if img.project_id == path_project_id}
    project_ids = {image.project_id for image in images.values()}
    projects = {pid: require_project(session, pid) for pid in project_ids}
    versions = newest_versions(session, list(projects))
    predictions = _predictions(session, images, versions)
    positions = _queue_positions(session, list(images))
    return {
        image_id: _Known(
            image,
            projects[image.project_id],
            versions[image.project_id].name,
            predictions.get(image_id),
            positions.get(image_id),
        )
        for image_id, image in images.items()
    }


def task_score(known: _Known | None) -> float:
    """Lower first: open queue items in pick order, then the rest, least confident first."""
    if known is None:
        return NO_PREDICTION_SCORE
    if known.queue_position is not None:
        rank, size = known.queue_position
        return BATCH_SHARE * rank / max(size, 1)
    prediction = known.prediction
    if prediction is None:
        return NO_PREDICTION_SCORE
    if prediction.predicted_loss is not None and prediction.predicted_loss >= 0:
        confidence = 1.0 / (1.0 + prediction.predicted_loss)
    elif prediction.class_probs:
        confidence = min(1.0, max(float(p) for p in prediction.class_probs))
    else:
        return NO_PREDICTION_SCORE
    return BATCH_SHARE + (1.0 - BATCH_SHARE) * confidence


def _choice_region(known: _Known, control: LsControl) -> dict[str, Any] | None:
    prediction = known.prediction
    if prediction is None or not prediction.class_probs:
        return None
    probs = [float(p) for p in prediction.class_probs]
    best = max(range(len(probs)), key=probs.__getitem__)
    classes = known.project.classes
    name = str(classes[best]) if best < len(classes) else None
    if name is None or name not in control.values:
        return None
    return control.choice_region(f"coreloop-{prediction.id}", name, probs[best])


def _brush_region(known: _Known, control: LsControl, storage: Storage) -> dict[str, Any] | None:
    prediction, image = known.prediction, known.image
    if prediction is None or prediction.mask_key is None or not control.values:
        return None
    try:
        mask = decode_png_mask(storage.read_bytes(prediction.mask_key), (image.height, image.width))
    except (OSError, ValueError, InvalidInput):
        log.warning("prediction %s: its mask cannot be read", prediction.id, exc_info=True)
        return None
    if not mask.any():
        return None
    named = [str(c) for c in known.project.classes if str(c) in control.values]
    label = (named or list(control.values))[0]
    rle = encode_mask(mask)
    return control.brush_region(f"coreloop-{prediction.id}", rle, image.width, image.height, label)


def _regions(known: _Known | None, config: LsLabelConfig, storage: Storage) -> list[dict[str, Any]]:
    if known is None:
        return []
    control = config.control(_expected_control(known.project))
    if control is None:
        return []
    if kind_of(known.project.task).takes_class:
        region = _choice_region(known, control)
    else:
        region = _brush_region(known, control, storage)
    return [region] if region is not None else []


def _fallback_version(
    session: Session, path_project_id: int | None, known: dict[int, _Known]
) -> str:
    """The model version given to tasks that are no coreloop image (empty predictions)."""
    if path_project_id is None:
        return next((k.version for k in known.values()), "coreloop")
    project_id = require_project(session, path_project_id).id
    return newest_versions(session, [project_id])[project_id].name


def predict(
    session: Session,
    storage: Storage,
    path_project_id: int | None,
    request: LsPredictRequest,
    caller: User | None = None,
) -> LsPredictResponse:
    """One prediction per task, in the tasks' order, from the newest model version's rows."""
    if path_project_id is not None:
        require_ls_reach(session, caller, path_project_id)
    config = LsLabelConfig.parse(request.label_config)
    wanted = {task.id: task.coreloop_image_id() for task in request.tasks}
    image_ids = [i for i in wanted.values() if i is not None]
    known = _known_images(session, image_ids, path_project_id)
    for project_id in sorted({entry.project.id for entry in known.values()}):
        require_ls_reach(session, caller, project_id)
    fallback = _fallback_version(session, path_project_id, known)
    results = []
    for task in request.tasks:
        image_id = wanted[task.id]
        entry = known.get(image_id) if image_id is not None else None
        results.append(
            LsPrediction(
                result=_regions(entry, config, storage),
                score=task_score(entry),
                model_version=entry.version if entry is not None else fallback,
            )
        )
    return LsPredictResponse(results=results)


# -- annotations (the webhook) ----------------------------------------------------------------


class UnknownLabelStudioUser(InvalidInput):
    code = "UnknownLabelStudioUser"


_MEMBER_ROLES = (Role.annotator.value, Role.admin.value)


def ls_member(session: Session, annotation: LsAnnotation) -> User:
    """The existing coreloop member standing for the annotation's Label Studio user: named
    after the user's e-mail (or ``ls:<e-mail>``), else ``ls:<Label Studio user id>``.

    No user is ever created: a Label Studio user without a member is refused, so neither a
    webhook caller nor a made-up ``completed_by`` can invent readers.
    """
    names = annotation.member_names()
    if names:
        found = {
            user.name: user
            for user in session.scalars(
                select(User).where(User.name.in_(names), User.role.in_(_MEMBER_ROLES))
            )
        }
        for name in names:
            if name in found:
                return found[name]
    raise UnknownLabelStudioUser(
        f"Annotation {annotation.id} is by Label Studio user {annotation.author_name()!r}, "
        f"who is no coreloop member; an admin creates one named "
        f"{(names or ['ls:<id>'])[-1]!r} (`coreloop users create --name ...`) to record them."
    )


def _mask_label(annotation: LsAnnotation, project: Project, image: Image) -> RleMask:
    """The union of the annotation's brush regions (those naming a class, if any do)."""
    try:
        brushes = annotation.brushes()
    except ValueError as exc:
        raise InvalidInput(f"Annotation {annotation.id}: {exc}.", code="InvalidRle") from exc
    classes = {str(c) for c in project.classes}
    named = [b for b in brushes if classes.intersection(b.labels)]
    mask = np.zeros((image.height, image.width), dtype=bool)
    for brush in named or brushes:
        if (brush.height, brush.width) != (image.height, image.width):
            raise InvalidInput(
                f"A brush region is {brush.width}x{brush.height} but image {image.id} is "
                f"{image.width}x{image.height}.",
                code="MaskSizeMismatch",
            )
        try:
            mask |= decode_mask(brush.rle, brush.width, brush.height)
        except ValueError as exc:
            raise InvalidInput(f"A brush RLE cannot be read: {exc}.", code="InvalidRle") from exc
    return RleMask.model_validate(mask_to_rle(mask))


def _label_create(event: LsAnnotationEvent, project: Project, image: Image) -> LabelCreate | None:
    annotation = event.annotation
    key = annotation.idempotency_key()
    if kind_of(project.task).takes_class:
        try:
            name = annotation.picked_class([str(c) for c in project.classes])
        except ValueError as exc:
            raise InvalidInput(f"{exc}: a label is one class.", code="InvalidClass") from exc
        if name is None:
            return None
        return LabelCreate(image_id=image.id, idempotency_key=key, class_name=name)
    mask = _mask_label(annotation, project, image)
    return LabelCreate(image_id=image.id, idempotency_key=key, mask_rle=mask)


def record_annotation(
    session: Session,
    settings: Settings,
    storage: Storage,
    event: LsAnnotationEvent,
    path_project_id: int | None = None,
) -> LsWebhookAck:
    """Store a Label Studio annotation as a coreloop label through the labels service.

    Idempotent per annotation version (id + updated_at); an update is a new label that
    supersedes the old one. Skipped annotations and tasks that are not coreloop images (of
    ``path_project_id``, when the URL names one) are acknowledged and ignored.
    """
    ack = LsWebhookAck(action=event.action, status="ignored")
    if event.annotation.was_cancelled:
        return ack.model_copy(update={"detail": "a skipped task"})
    author = ls_member(session, event.annotation)
    image_id = event.task.coreloop_image_id()
    image = session.get(Image, image_id) if image_id is not None else None
    if image is None or path_project_id not in (None, image.project_id):
        log.warning("Label Studio task %s is not a coreloop image; ignored", event.task.id)
        return ack.model_copy(update={"detail": f"task {event.task.id} is no coreloop image"})
    project = require_project(session, image.project_id)
    data = _label_create(event, project, image)
    if data is None:
        return ack.model_copy(update={"detail": "the annotation picks no class"})
    label, created = create_label(
        session, settings, storage, author, data, source=LabelSource.label_studio
    )
    status = "recorded" if created else "replayed"
    return LsWebhookAck(action=event.action, status=status, label_id=label.id)
