"""Images: validated, stored by content hash, registered only after their file exists.

An upload is all or nothing: every file is read (bounded) and decoded first; only then are
files written (temp, then rename, by ``Storage``) and rows inserted. If the insert fails, the
files this call wrote are deleted again. The client's file name is kept as metadata only; the
storage key comes from the content hash and the decoded format.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from app.labels.kinds import kind_of
from app.labels.masks import palette_foreground
from app.models import Image, Label, LabelSource, Project, Split, User
from app.storage import Storage

# Decoded format -> (file extension, content type); other formats are refused.
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "TIFF": ("tif", "image/tiff"),
    "BMP": ("bmp", "image/bmp"),
    "WEBP": ("webp", "image/webp"),
}
SPLITS = tuple(s.value for s in Split)
_CHUNK = 1 << 20


class InvalidImage(InvalidInput):
    code = "InvalidImage"


class UploadTooLarge(PayloadTooLarge):
    code = "UploadTooLarge"


class ImageNotFound(NotFound):
    code = "ImageNotFound"


class UnknownClass(InvalidInput):
    code = "UnknownClass"


class UploadConflict(Conflict):
    code = "UploadConflict"


@dataclass(frozen=True)
class PreparedImage:
    """A decoded, validated image (and optionally its label) not yet stored."""

    filename: str
    data: bytes
    sha256: str
    ext: str
    content_type: str
    width: int
    height: int
    meta: dict[str, Any] = field(default_factory=dict)
    class_name: str | None = None
    mask_png: bytes | None = None  # a 0/255 PNG of the image's size


@dataclass(frozen=True)
class StoredImage:
    filename: str
    status: Literal["created", "duplicate"]
    image: Image
    labeled: bool


def clean_filename(name: str | None) -> str:
    """The last path component, printable characters only: metadata, never a path."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] if base not in ("", ".", "..") else "upload"


def read_limited(stream: BinaryIO, limit: int, filename: str) -> bytes:
    """Read ``stream`` in chunks, stopping as soon as it exceeds ``limit`` bytes."""
    buf = bytearray()
    while chunk := stream.read(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise UploadTooLarge(f"{filename!r} is larger than the limit of {limit} bytes.")
    return bytes(buf)


def _decode(filename: str, data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Check that ``data`` is a whole image of an allowed format; returns (format, w, h)."""
    try:
        with PILImage.open(io.BytesIO(data)) as probe:
            fmt, (width, height) = probe.format or "", probe.size
            if width * height > max_pixels:  # checked before any pixel is decoded
                raise InvalidImage(
                    f"{filename!r} has {width}x{height} pixels, more than the limit "
                    f"of {max_pixels}."
                )
            probe.verify()
        with PILImage.open(io.BytesIO(data)) as full:
            full.load()
    except InvalidImage:
        raise
    except Exception as exc:  # Pillow raises many types on untrusted bytes; all mean "bad file"
        raise InvalidImage(f"{filename!r} is not a readable image ({exc}).") from exc
    if fmt not in FORMATS or width < 1 or height < 1:
        raise InvalidImage(f"{filename!r}: format {fmt or 'unknown'} is not accepted.")
    return fmt, width, height


def normalise_mask(filename: str, data: bytes, size: tuple[int, int], max_pixels: int) -> bytes:
    """A binary mask as a 0/255 grayscale PNG; it must have the image's size."""
    _decode(filename, data, max_pixels)
    with PILImage.open(io.BytesIO(data)) as mask:
        if mask.size != size:
            raise InvalidImage(f"mask {filename!r} is {mask.size}, the image is {size}.")
        if mask.mode in ("P", "PA"):  # a label map: palette indices, not grey levels
            gray = PILImage.fromarray(palette_foreground(mask).astype(np.uint8) * 255)
        else:
            gray = mask.convert("L")
    low_high = gray.getextrema()
    high = low_high[1] if isinstance(low_high, tuple) else low_high
    threshold = 0 if isinstance(high, int | float) and high <= 1 else 127  # 0/1 or 0/255 masks
    binary = gray.point(lambda v: 255 if v > threshold else 0)
    buf = io.BytesIO()
    binary.save(buf, format="PNG")
    return buf.getvalue()


def prepare_image(
    filename: str,
    data: bytes,
    *,
    max_pixels: int,
    meta: dict[str, Any] | None = None,
    class_name: str | None = None,
    mask: bytes | None = None,
) -> PreparedImage:
    """Decode and check one image (and its mask); raises ``InvalidImage`` naming the file."""
    fmt, width, height = _decode(filename, data, max_pixels)
    ext, content_type = FORMATS[fmt]
    mask_png = None
    if mask is not None:
        mask_png = normalise_mask(f"{filename} (mask)", mask, (width, height), max_pixels)
    return PreparedImage(
        filename=filename,
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        ext=ext,
        content_type=content_type,
        width=width,
        height=height,
        meta=dict(meta or {}),
        class_name=class_name,
        mask_png=mask_png,
    )


def _check_labels(project: Project, items: Sequence[PreparedImage]) -> None:
    for item in items:
        if item.class_name is not None:
            if not kind_of(project.task).takes_class:
                raise UnknownClass("A segmentation project takes masks, not class labels.")
            if item.class_name not in project.classes:
                raise UnknownClass(
                    f"{item.class_name!r} is not a class of project {project.name!r}; "
                    f"its classes are {project.classes}."
                )
        if item.mask_png is not None and not kind_of(project.task).takes_mask:
            raise InvalidInput(f"{item.filename!r}: masks are for segmentation projects.")


def image_key(project_id: int, sha256: str, ext: str) -> str:
    return f"images/{project_id}/{sha256}.{ext}"


def import_mask_key(project_id: int, sha256: str) -> str:
    return f"masks/{project_id}/{sha256}-import.png"


def _import_label_key(project_id: int, sha256: str, item: PreparedImage) -> str:
    what = "mask" if item.mask_png is not None else item.class_name
    return f"import:{project_id}:{sha256}:{what}"


def _write_files(
    storage: Storage, project_id: int, new: Sequence[PreparedImage], masks: Sequence[PreparedImage]
) -> list[str]:
    """Write the new files; returns the keys this call created (not those already there).

    An image file already there has the same content (its name is its hash) and is kept; a
    mask is always written, since no label refers to it yet (a leftover of a failed import).
    """
    files = [(image_key(project_id, i.sha256, i.ext), i.data, False) for i in new]
    files += [(import_mask_key(project_id, i.sha256), i.mask_png or b"", True) for i in masks]
    written: list[str] = []
    try:
        for key, data, overwrite in files:
            existed = storage.exists(key)
            if overwrite or not existed:
                storage.put_bytes(key, data)
            if not existed:
                written.append(key)
    except BaseException:
        _discard_unreferenced(None, storage, written)
        raise
    return written


def _discard_unreferenced(session: Session | None, storage: Storage, keys: list[str]) -> None:
    """Delete files this call wrote, unless a row (say, a concurrent upload's) now uses them."""
    if not keys:
        return
    used: set[str] = set()
    if session is not None:
        try:
            used |= set(
                session.scalars(select(Image.storage_key).where(Image.storage_key.in_(keys)))
            )
            used |= {
                k
                for k in session.scalars(select(Label.mask_key).where(Label.mask_key.in_(keys)))
                if k is not None
            }
        except Exception:  # the session is unusable: keep the files rather than guess
            return
    for key in keys:
        if key not in used:
            storage.delete(key)


def _label_row(project: Project, image: Image, item: PreparedImage, author: User | None) -> Label:
    return Label(
        project_id=project.id,
        image_id=image.id,
        author_id=author.id if author else None,
        author_name=author.name if author else "import",
        source=LabelSource.import_.value,
        class_index=project.classes.index(item.class_name) if item.class_name else None,
        mask_key=import_mask_key(project.id, image.sha256) if item.mask_png else None,
        idempotency_key=_import_label_key(project.id, image.sha256, item),
    )


def store_images(
    session: Session,
    storage: Storage,
    project: Project,
    items: Sequence[PreparedImage],
    *,
    split: str,
    author: User | None,
) -> list[StoredImage]:
    """Store prepared images (new content only) and their import labels, all or nothing.

    A file whose content is already in the project is a duplicate: not stored again, but its
    label (if any and not imported before) is added, so an interrupted import can be re-run.
    """
    if split not in SPLITS:
        raise InvalidInput(f"split must be one of {list(SPLITS)}, not {split!r}.")
    _check_labels(project, items)
    shas = {i.sha256 for i in items}
    existing = {
        img.sha256: img
        for img in session.scalars(
            select(Image).where(Image.project_id == project.id, Image.sha256.in_(shas))
        )
    }
    new: dict[str, PreparedImage] = {}  # first occurrence of each new content, in order
    wanted: dict[str, PreparedImage] = {}  # label idempotency key -> item
    for item in items:
        if item.sha256 not in existing:
            new.setdefault(item.sha256, item)
        if _labeled(item):
            wanted.setdefault(_import_label_key(project.id, item.sha256, item), item)
    # Keys are per author (migration 0004): another user's label never counts as imported.
    same_author = Label.author_id.is_(None) if author is None else Label.author_id == author.id
    known = set(
        session.scalars(
            select(Label.idempotency_key).where(same_author, Label.idempotency_key.in_(wanted))
        )
    )
    to_label = {k: i for k, i in wanted.items() if k not in known}
    masks = [i for i in to_label.values() if i.mask_png is not None]
    written = _write_files(storage, project.id, list(new.values()), masks)
    try:
        with session.begin_nested():
            rows = _insert_rows(session, project, list(new.values()), split, existing)
            for item in to_label.values():
                session.add(_label_row(project, rows[item.sha256], item, author))
            session.flush()
    except IntegrityError as exc:
        _discard_unreferenced(session, storage, written)
        raise UploadConflict(
            "Storing the images conflicted with a concurrent change; retry."
        ) from exc
    except BaseException:
        _discard_unreferenced(session, storage, written)
        raise
    return _outcomes(project.id, items, rows, existing, set(to_label))


def _labeled(item: PreparedImage) -> bool:
    return item.class_name is not None or item.mask_png is not None


def _insert_rows(
    session: Session,
    project: Project,
    new: Sequence[PreparedImage],
    split: str,
    existing: dict[str, Image],
) -> dict[str, Image]:
    rows = dict(existing)
    for item in new:
        rows[item.sha256] = Image(
            project_id=project.id,
            sha256=item.sha256,
            storage_key=image_key(project.id, item.sha256, item.ext),
            filename=item.filename,
            content_type=item.content_type,
            width=item.width,
            height=item.height,
            split=split,
            meta=item.meta,
        )
        session.add(rows[item.sha256])
    session.flush()
    return rows


def _outcomes(
    project_id: int,
    items: Sequence[PreparedImage],
    rows: dict[str, Image],
    existing: dict[str, Image],
    label_keys: set[str],
) -> list[StoredImage]:
    seen: set[str] = set(existing)
    outcomes = []
    for item in items:
        key = _import_label_key(project_id, item.sha256, item)
        labeled = _labeled(item) and key in label_keys
        label_keys.discard(key)  # a file sent twice is labeled once
        status: Literal["created", "duplicate"] = "duplicate" if item.sha256 in seen else "created"
        seen.add(item.sha256)
        outcomes.append(StoredImage(item.filename, status, rows[item.sha256], labeled))
    return outcomes


def upload_images(
    session: Session,
    storage: Storage,
    project: Project,
    uploads: Sequence[tuple[str | None, BinaryIO]],
    *,
    split: str,
    class_name: str | None,
    meta: dict[str, Any],
    author: User,
    max_bytes: int,
    max_pixels: int,
) -> list[StoredImage]:
    """Read (bounded), validate, then store every upload of one request: all or nothing."""
    prepared = []
    for raw_name, stream in uploads:
        name = clean_filename(raw_name)
        data = read_limited(stream, max_bytes, name)
        prepared.append(
            prepare_image(name, data, max_pixels=max_pixels, meta=meta, class_name=class_name)
        )
    return store_images(session, storage, project, prepared, split=split, author=author)


def get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, image_id)
    if image is None:
        raise ImageNotFound(f"No image with id {image_id}.")
    return image


def current_label(session: Session, image_id: int, author_id: int | None = None) -> Label | None:
    """The newest label of the image (labels are append-only); only ``author_id``'s when given
    (blind reads, ``app.members.service``)."""
    query = select(Label).where(Label.image_id == image_id)
    if author_id is not None:
        query = query.where(Label.author_id == author_id)
    return session.scalar(query.order_by(Label.id.desc()).limit(1))


def list_images(
    session: Session, project_id: int, *, split: str | None, limit: int, offset: int
) -> tuple[list[Image], int]:
    """One page of a project's images in upload order, and the total matching."""
    query = select(Image).where(Image.project_id == project_id)
    if split is not None:
        query = query.where(Image.split == split)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Image.id).limit(limit).offset(offset))
    return list(page), total
