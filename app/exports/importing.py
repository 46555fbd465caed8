"""Storing parsed import entries as labels of the project's existing images.

Each entry is matched to an image of the project: by content hash, else by coreloop image id,
else by a file name that is unique in the project; entries without an image are counted and
skipped. Labels go through the labels service (validation, queue counts, events) and are then
marked source ``import``. Idempotency keys are derived from the content:
``fmt:<project>:<image>:<n>:<digest>``, ``n`` being the entry's position among the file's
entries for that image, so a re-import (by the same user: keys are per author) stores nothing
and a history export replays in order.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import CoreloopError, InvalidInput
from app.exports.schemas import ImportFormat, ImportResult
from app.labels import service as labels_service
from app.labels.masks import Mask, mask_to_rle
from app.labels.schemas import LabelCreate, RleMask
from app.models import Image, Label, LabelSource, User
from app.queue.service import require_project
from app.settings import Settings
from app.storage import Storage

_IN_CHUNK = 500
_EXAMPLES = 20

MaskSource = Callable[[tuple[int, int]], Mask]  # the image's (height, width) -> the mask


@dataclass(frozen=True)
class ImageRef:
    """How a file names an image: its coreloop id, content hash and/or file name."""

    image_id: int | None = None
    sha256: str | None = None
    filename: str | None = None

    def describe(self) -> str:
        parts = {"image_id": self.image_id, "sha256": self.sha256, "filename": self.filename}
        return ", ".join(f"{k}={v!r}" for k, v in parts.items() if v not in (None, ""))


@dataclass(frozen=True)
class IncomingLabel:
    """One entry of an import file: a class (name or index) or a mask, decoded when stored."""

    ref: ImageRef
    class_name: str | None = None
    class_index: int | None = None
    mask: MaskSource | None = None


def invalid_file(fmt: str, detail: str) -> InvalidInput:
    return InvalidInput(f"The {fmt} file cannot be imported: {detail}", code="InvalidImportFile")


def size_mismatch(got: tuple[int, int], image_hw: tuple[int, int]) -> InvalidInput:
    return InvalidInput(
        f"The mask is {got[1]}x{got[0]} (width x height) but the image is "
        f"{image_hw[1]}x{image_hw[0]}.",
        code="MaskSizeMismatch",
    )


def _chunks(values: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _images_where(session: Session, project_id: int, column: Any, values: set[Any]) -> list[Image]:
    found: list[Image] = []
    for chunk in _chunks(sorted(values)):
        found += session.scalars(
            select(Image).where(Image.project_id == project_id, column.in_(chunk))
        )
    return found


def resolve_images(
    session: Session, project_id: int, refs: set[ImageRef]
) -> dict[ImageRef, Image | None]:
    """The project's image for each ref (None when there is none, or the name is ambiguous)."""
    shas = {r.sha256 for r in refs if r.sha256}
    ids = {r.image_id for r in refs if r.image_id is not None}
    names = {r.filename for r in refs if r.filename}
    by_sha = {i.sha256: i for i in _images_where(session, project_id, Image.sha256, shas)}
    by_id = {i.id: i for i in _images_where(session, project_id, Image.id, ids)}
    by_name: dict[str, list[Image]] = defaultdict(list)
    for image in _images_where(session, project_id, Image.filename, names):
        by_name[image.filename].append(image)
    resolved: dict[ImageRef, Image | None] = {}
    for ref in refs:
        named = by_name.get(ref.filename or "", [])
        resolved[ref] = (
            by_sha.get(ref.sha256 or "")
            or (by_id.get(ref.image_id) if ref.image_id is not None else None)
            or (named[0] if len(named) == 1 else None)
        )
    return resolved


def mask_digest(mask: Mask) -> str:
    bits = np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes()
    return hashlib.sha256(repr(mask.shape).encode() + bits).hexdigest()


def _content(item: IncomingLabel, image: Image, classes: list[str]) -> tuple[LabelCreate, str]:
    """The label to create (its key still a placeholder) and the digest of its content."""
    if item.mask is not None:
        mask = item.mask((image.height, image.width))
        if mask.shape != (image.height, image.width):
            raise size_mismatch((mask.shape[0], mask.shape[1]), (image.height, image.width))
        rle = RleMask.model_validate(mask_to_rle(mask))
        return LabelCreate(image_id=image.id, idempotency_key="-", mask_rle=rle), mask_digest(mask)
    name, index = item.class_name, item.class_index
    if name is None and index is not None and 0 <= index < len(classes):
        name, index = classes[index], None
    data = LabelCreate(image_id=image.id, idempotency_key="-", class_name=name, class_index=index)
    return data, hashlib.sha256(f"class:{name}:{index}".encode()).hexdigest()


def _existing_keys(session: Session, user: User, keys: list[str]) -> set[str]:
    """The keys ``user`` has already stored labels under (keys are per author)."""
    found: set[str] = set()
    for chunk in _chunks(keys):
        found |= set(
            session.scalars(
                select(Label.idempotency_key).where(
                    Label.author_id == user.id, Label.idempotency_key.in_(chunk)
                )
            )
        )
    return found


def _located(exc: CoreloopError, where: str) -> CoreloopError:
    """The same error (code and status) saying which entry of the file it is about."""
    return type(exc)(f"{where}: {exc.detail}", code=exc.code, status_code=exc.status_code)


@dataclass(frozen=True)
class _Planned:
    key: str
    data: LabelCreate
    where: str


def _plan(
    session: Session, project_id: int, classes: list[str], items: list[IncomingLabel]
) -> tuple[list[_Planned], list[str]]:
    """Keys and label data of the matched entries (in file order); the unmatched entries."""
    images = resolve_images(session, project_id, {item.ref for item in items})
    seen: dict[int, int] = defaultdict(int)
    planned: list[_Planned] = []
    unmatched: list[str] = []
    for n, item in enumerate(items):
        image = images[item.ref]
        if image is None:
            unmatched.append(item.ref.describe())
            continue
        where = f"entry {n} (image {image.id}, {image.filename!r})"
        try:
            data, digest = _content(item, image, classes)
        except CoreloopError as exc:
            raise _located(exc, where) from exc
        key = f"fmt:{project_id}:{image.id}:{seen[image.id]}:{digest[:32]}"
        seen[image.id] += 1
        planned.append(_Planned(key, data.model_copy(update={"idempotency_key": key}), where))
    return planned, unmatched


def import_labels(
    session: Session,
    settings: Settings,
    storage: Storage,
    user: User,
    project_id: int,
    fmt: ImportFormat,
    items: list[IncomingLabel],
) -> ImportResult:
    """Store ``items`` (one file's entries, in file order) as labels; all or nothing."""
    project = require_project(session, project_id)
    planned, unmatched = _plan(session, project.id, [str(c) for c in project.classes], items)
    known = _existing_keys(session, user, [p.key for p in planned])
    for entry in planned:
        if entry.key in known:
            continue
        try:
            labels_service.create_label(
                session, settings, storage, user, entry.data, source=LabelSource.import_
            )
        except CoreloopError as exc:
            raise _located(exc, entry.where) from exc
    return ImportResult(
        format=fmt,
        labels_in_file=len(items),
        created=len(planned) - len(known),
        unchanged=len(known),
        unmatched=len(unmatched),
        unmatched_examples=unmatched[:_EXAMPLES],
    )
