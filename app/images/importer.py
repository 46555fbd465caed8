"""Import a data set from a folder (plus a CSV) in-process, through the image service.

Layouts:
- ``ham10000``: ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,dx_type,age,sex,localization``)
  and ``<image_id>.jpg`` files; ``dx`` is the class, every other column goes into ``meta``.
- ``isic``: ``<id>.jpg`` images and ``<id>_segmentation.png`` masks (``masks_dir``, default the
  image folder); the masks are the labels of a segmentation project.
- ``folders``: one subfolder per class, named after it.

Any layout takes ``masks_dir`` (``<stem>_segmentation.png``) for a segmentation project. Work is
committed in batches, each its own unit of work, so an interrupted import keeps what it did;
re-running it skips files already stored (by content hash) and labels already imported.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from app.db import unit_of_work
from app.errors import CoreloopError, InvalidInput
from app.images.service import PreparedImage, prepare_image, read_limited, store_images
from app.labels.kinds import kind_of
from app.models import Project
from app.projects.service import find_project, get_project
from app.settings import Settings
from app.storage import Storage

Layout = Literal["ham10000", "isic", "folders"]
LAYOUTS: tuple[str, ...] = ("ham10000", "isic", "folders")
HAM10000_CSV = "HAM10000_metadata.csv"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
MASK_SUFFIX = "_segmentation.png"


class ImportFailed(InvalidInput):
    code = "ImportFailed"


@dataclass(frozen=True)
class ImportEntry:
    """One image to import: its file, metadata, class name and mask file (if any)."""

    path: Path
    meta: dict[str, Any]
    class_name: str | None = None
    mask_path: Path | None = None


@dataclass(frozen=True)
class ImportOptions:
    layout: Layout = "ham10000"
    csv_path: Path | None = None
    masks_dir: Path | None = None
    split: str = "pool"
    with_labels: bool = False
    limit: int | None = None
    batch_size: int = 200
    progress: bool = True


@dataclass
class ImportResult:
    created: int = 0
    duplicates: int = 0
    labeled: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        self.messages.append(message)


def _mask_for(masks_dir: Path | None, image: Path) -> Path | None:
    return masks_dir / f"{image.stem}{MASK_SUFFIX}" if masks_dir is not None else None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise ImportFailed(f"CSV file {str(path)!r} not found.")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def ham10000_entries(
    images_dir: Path, csv_path: Path | None, masks_dir: Path | None
) -> list[ImportEntry]:
    """Entries in the CSV's order; the CSV defaults to the image folder or its parent."""
    if csv_path is None:
        candidates = [images_dir / HAM10000_CSV, images_dir.parent / HAM10000_CSV]
        csv_path = next((c for c in candidates if c.is_file()), candidates[0])
    rows = _read_csv(csv_path)
    missing = {"image_id", "dx"} - set(rows[0] if rows else {})
    if missing:
        raise ImportFailed(f"{csv_path.name} lacks the column(s) {sorted(missing)}.")
    entries = []
    for row in rows:
        path = images_dir / f"{row['image_id']}.jpg"
        meta = {k: (v if v != "" else None) for k, v in row.items() if k != "dx" and k}
        entries.append(ImportEntry(path, meta, row["dx"].strip(), _mask_for(masks_dir, path)))
    return entries


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX)
    )


def _csv_meta(csv_path: Path | None) -> dict[str, dict[str, Any]]:
    """Extra metadata keyed by image id (column ``image_id``, else the first column)."""
    if csv_path is None:
        return {}
    rows = _read_csv(csv_path)
    key = "image_id" if rows and "image_id" in rows[0] else next(iter(rows[0]), "") if rows else ""
    return {row[key]: {k: v for k, v in row.items() if k} for row in rows}


def isic_entries(
    images_dir: Path, csv_path: Path | None, masks_dir: Path | None
) -> list[ImportEntry]:
    meta = _csv_meta(csv_path)
    masks = masks_dir or images_dir
    return [
        ImportEntry(p, dict(meta.get(p.stem, {})), None, _mask_for(masks, p))
        for p in _image_files(images_dir)
    ]


def folders_entries(
    images_dir: Path, csv_path: Path | None, masks_dir: Path | None
) -> list[ImportEntry]:
    meta = _csv_meta(csv_path)
    entries = []
    for folder in sorted(p for p in images_dir.iterdir() if p.is_dir()):
        for path in _image_files(folder):
            extra = dict(meta.get(path.stem, {}))
            entries.append(ImportEntry(path, extra, folder.name, _mask_for(masks_dir, path)))
    return entries


_READERS = {"ham10000": ham10000_entries, "isic": isic_entries, "folders": folders_entries}


def list_entries(images_dir: Path, options: ImportOptions) -> list[ImportEntry]:
    """What the layout says is there (files are checked later, one by one)."""
    if not images_dir.is_dir():
        raise ImportFailed(f"Image folder {str(images_dir)!r} not found.")
    if options.layout not in _READERS:
        raise ImportFailed(f"Unknown layout {options.layout!r}; use one of {list(LAYOUTS)}.")
    entries = _READERS[options.layout](images_dir, options.csv_path, options.masks_dir)
    return entries[: options.limit] if options.limit is not None else entries


def check_labels(project: Project, entries: Sequence[ImportEntry], layout: str) -> None:
    """Refuse up front a label import that cannot fit the project."""
    if kind_of(project.task).takes_mask:
        if layout != "isic" and not any(e.mask_path for e in entries):
            raise ImportFailed("Segmentation labels are masks: give --masks DIR.")
        return
    if any(e.class_name is None for e in entries):
        raise ImportFailed(f"The {layout} layout has no class labels for a classification project.")
    unknown = sorted({e.class_name or "" for e in entries if e.class_name not in project.classes})
    if unknown:
        raise ImportFailed(
            f"Classes {unknown} are not in project {project.name!r} (classes {project.classes})."
        )


def _read(path: Path, limit: int) -> bytes:
    with path.open("rb") as fh:
        return read_limited(fh, limit, path.name)


def prepare_entry(
    entry: ImportEntry, task: str, settings: Settings, with_labels: bool
) -> PreparedImage:
    """Read and validate one entry (with its label when ``with_labels``)."""
    data = _read(entry.path, settings.max_upload_bytes)
    kind = kind_of(task)
    class_name = entry.class_name if with_labels and kind.takes_class else None
    mask = None
    if with_labels and kind.takes_mask:
        if entry.mask_path is None or not entry.mask_path.is_file():
            raise ImportFailed(f"{entry.path.name}: no mask {entry.mask_path}.")
        mask = _read(entry.mask_path, settings.max_upload_bytes)
    return prepare_image(
        entry.path.name,
        data,
        max_pixels=settings.max_image_pixels,
        meta=entry.meta,
        class_name=class_name,
        mask=mask,
    )


def _batches(entries: Sequence[ImportEntry], size: int) -> Iterator[Sequence[ImportEntry]]:
    for start in range(0, len(entries), size):
        yield entries[start : start + size]


def import_images(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    project_ref: str,
    images_dir: Path,
    options: ImportOptions,
) -> ImportResult:
    """Import ``images_dir`` into the project named (or numbered) ``project_ref``."""
    if options.split not in ("pool", "val", "test"):
        raise ImportFailed(f"split must be pool, val or test, not {options.split!r}.")
    with unit_of_work(sessions) as session:
        project = find_project(session, project_ref)
        project_id, task = project.id, project.task
        entries = list_entries(images_dir, options)
        if options.with_labels:
            check_labels(project, entries, options.layout)
    result = ImportResult()
    with tqdm(total=len(entries), unit="img", disable=not options.progress) as bar:
        for batch in _batches(entries, max(1, options.batch_size)):
            prepared = []
            for entry in batch:
                try:
                    prepared.append(prepare_entry(entry, task, settings, options.with_labels))
                except (CoreloopError, OSError) as exc:
                    result.error(f"{entry.path.name}: {getattr(exc, 'detail', exc)}")
                bar.update()
            _store_batch(sessions, storage, project_id, prepared, options, result)
    return result


def _store_batch(
    sessions: sessionmaker[Session],
    storage: Storage,
    project_id: int,
    prepared: Sequence[PreparedImage],
    options: ImportOptions,
    result: ImportResult,
) -> None:
    if not prepared:
        return
    with unit_of_work(sessions) as session:
        project = get_project(session, project_id)
        stored = store_images(session, storage, project, prepared, split=options.split, author=None)
    for item in stored:
        result.created += item.status == "created"
        result.duplicates += item.status == "duplicate"
        result.labeled += item.labeled
