"""Label export and import: Label Studio tasks, COCO, a CSV of classes, a zip of PNG masks.

- ``ls`` (``labelstudio.py``): Label Studio tasks with annotations and predictions.
- ``coco`` (``coco.py``): images, categories, annotations with RLE masks.
- ``csv`` (``tabular.py``): one row per class label (classification projects).
- ``masks`` (``tabular.py``): a zip of 0/255 PNG masks and a manifest (segmentation projects).

Exports stream (``rows.py``: a page of images per fresh query, bounded by the ids seen at the
start). ``history=False`` gives each image's current label, ``history=True`` every label,
oldest first. Imports (``importing.py``) go through the labels service with source ``import``
and content-derived idempotency keys; an export imported into a project with the same images
gives the same labels (classes, and masks bit for bit), in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput
from app.exports.coco import export_coco, parse_coco
from app.exports.importing import IncomingLabel, import_labels
from app.exports.labelstudio import export_ls, parse_ls
from app.exports.rows import ProjectSnapshot, snapshot_project
from app.exports.schemas import ExportFormat, ImportFormat, ImportResult
from app.exports.tabular import export_csv, export_masks, parse_csv, parse_masks
from app.labels.kinds import KINDS
from app.models import User
from app.queue.service import require_project
from app.settings import Settings
from app.storage import Storage

__all__ = [
    "MEDIA_TYPES",
    "ProjectSnapshot",
    "check_format",
    "export_stream",
    "import_file",
    "parse_import",
    "snapshot_project",
]

# format -> (media type, file extension)
MEDIA_TYPES: dict[str, tuple[str, str]] = {
    "ls": ("application/json", "json"),
    "coco": ("application/json", "json"),
    "csv": ("text/csv; charset=utf-8", "csv"),
    "masks": ("application/zip", "zip"),
}
_NEEDS_TASK = {fmt: kind.name for kind in KINDS.values() for fmt in kind.own_formats}


def check_format(task: str, fmt: str) -> None:
    """``csv`` carries classes and ``masks`` carries masks; refuse them for the other task."""
    needed = _NEEDS_TASK.get(fmt)
    if needed is not None and task != needed:
        raise InvalidInput(
            f"Format {fmt!r} is for {needed} projects; this one is a {task} project. "
            "Use 'ls' or 'coco', which carry both.",
            code="FormatNotForTask",
        )


def export_stream(
    fmt: ExportFormat,
    sessions: sessionmaker[Session],
    storage: Storage,
    snap: ProjectSnapshot,
    *,
    history: bool,
    base_url: str,
) -> Iterator[bytes]:
    """The export's bytes, produced as the response is sent (see ``rows.iter_rows``)."""
    check_format(snap.task, fmt)
    if fmt == "ls":
        return export_ls(sessions, storage, snap, history=history, base_url=base_url)
    if fmt == "coco":
        return export_coco(sessions, storage, snap, history=history)
    if fmt == "csv":
        return export_csv(sessions, snap, history=history)
    return export_masks(sessions, storage, snap, history=history)


def parse_import(fmt: ImportFormat, data: bytes, *, max_entry_bytes: int) -> list[IncomingLabel]:
    if fmt == "ls":
        return parse_ls(data)
    if fmt == "coco":
        return parse_coco(data)
    if fmt == "csv":
        return parse_csv(data)
    return parse_masks(data, max_entry_bytes)


def import_file(
    session: Session,
    settings: Settings,
    storage: Storage,
    user: User,
    project_id: int,
    fmt: ImportFormat,
    data: bytes,
) -> ImportResult:
    """Parse one uploaded file and store its labels for the project's existing images."""
    project = require_project(session, project_id)
    check_format(project.task, fmt)
    items = parse_import(fmt, data, max_entry_bytes=settings.max_upload_bytes)
    return import_labels(session, settings, storage, user, project.id, fmt, items)
