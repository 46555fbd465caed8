"""A CSV of class labels, and a zip of PNG masks with a manifest CSV: export and import.

CSV (classification): ``image_id,filename,sha256,class_index,class_name,author,source,
created_at``, one row per label. Import needs a way to find the image (``sha256``,
``image_id`` or ``filename``) and the class (``class_name``, else ``class_index``).

Zip (segmentation): ``masks/<image_id>_<filename stem>.png`` (8-bit, 0/255) per current label
(``history``: ``..._label<label id>.png`` per label) and ``manifest.csv`` with
``image_id,filename,sha256,label_id,mask,author,source,created_at``; the zip is written to the
response as it is built (zipfile on an unseekable sink, data descriptors after each entry).
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import PurePosixPath

from sqlalchemy.orm import Session, sessionmaker

from app.exports.importing import ImageRef, IncomingLabel, MaskSource, invalid_file
from app.exports.rows import ProjectSnapshot, iter_rows, read_mask
from app.exports.schemas import CONSENSUS, CSV_COLUMNS, MANIFEST_COLUMNS
from app.labels.masks import Mask, decode_png_mask, encode_png_mask
from app.models import Image, Label
from app.storage import Storage

MANIFEST = "manifest.csv"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _csv_line(values: list[object]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue().encode()


def _common(image: Image) -> list[object]:
    return [image.id, image.filename, image.sha256]


def export_csv(
    sessions: sessionmaker[Session], snap: ProjectSnapshot, *, history: bool
) -> Iterator[bytes]:
    yield _csv_line(list(CSV_COLUMNS))
    for row in iter_rows(sessions, snap, history=history):
        for label in row.labels:
            if label.class_index is None:
                continue
            yield _csv_line(
                [
                    *_common(row.image),
                    label.class_index,
                    snap.class_name(label.class_index),
                    label.author_name or "",
                    label.source,
                    label.created_at.isoformat(),
                ]
            )
        agreed = row.consensus
        if agreed is not None and agreed.class_index is not None:  # several readers
            name = snap.class_name(agreed.class_index)
            yield _csv_line([*_common(row.image), agreed.class_index, name, "", CONSENSUS, ""])


class _Sink(io.RawIOBase):
    """An unseekable file that keeps what is written until :meth:`take` hands it out."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def mask_path(image: Image, label: Label, history: bool) -> str:
    stem = _UNSAFE.sub("_", PurePosixPath(image.filename).stem)[:100] or "image"
    suffix = f"_label{label.id}" if history else ""
    return f"masks/{image.id}_{stem}{suffix}.png"


def export_masks(
    sessions: sessionmaker[Session], storage: Storage, snap: ProjectSnapshot, *, history: bool
) -> Iterator[bytes]:
    """The zip, yielded entry by entry; the manifest is the last entry."""
    sink = _Sink()
    manifest = [_csv_line(list(MANIFEST_COLUMNS))]
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for row in iter_rows(sessions, snap, history=history):
            for label in row.labels:
                if label.mask_key is None:
                    continue
                path = mask_path(row.image, label, history)
                mask = read_mask(storage, label.mask_key, row.image)
                archive.writestr(path, encode_png_mask(mask))  # PNG is compressed already
                manifest.append(
                    _csv_line(
                        [
                            *_common(row.image),
                            label.id,
                            path,
                            label.author_name or "",
                            label.source,
                            label.created_at.isoformat(),
                        ]
                    )
                )
                yield sink.take()
        archive.writestr(MANIFEST, b"".join(manifest), compress_type=zipfile.ZIP_DEFLATED)
    yield sink.take()


def _int_or_none(value: str | None, where: str) -> int | None:
    text = (value or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise invalid_file("CSV", f"{where}: {text!r} is not an integer") from None


def _rows(data: bytes, what: str, needed: tuple[set[str], ...]) -> list[dict[str, str]]:
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise invalid_file(what, f"not a UTF-8 CSV ({exc})") from exc
    for options in needed:
        if not columns & options:
            raise invalid_file(what, f"it needs one of the columns {sorted(options)}")
    return rows


def _ref(row: dict[str, str], where: str) -> ImageRef:
    return ImageRef(
        image_id=_int_or_none(row.get("image_id"), where),
        sha256=(row.get("sha256") or "").strip() or None,
        filename=(row.get("filename") or "").strip() or None,
    )


_IMAGE_COLUMNS = {"image_id", "sha256", "filename"}


def parse_csv(data: bytes) -> list[IncomingLabel]:
    rows = _rows(data, "CSV", (_IMAGE_COLUMNS, {"class_name", "class_index"}))
    items: list[IncomingLabel] = []
    for line, row in enumerate(rows, start=2):
        if (row.get("source") or "").strip() == CONSENSUS:
            continue  # derived from the reads, which are imported themselves
        where = f"line {line}"
        name = (row.get("class_name") or "").strip() or None
        index = _int_or_none(row.get("class_index"), where)
        if name is None and index is None:
            raise invalid_file("CSV", f"{where} has neither class_name nor class_index")
        items.append(IncomingLabel(_ref(row, where), class_name=name, class_index=index))
    return items


def _png_source(archive: zipfile.ZipFile, path: str) -> MaskSource:
    def decode(image_hw: tuple[int, int]) -> Mask:
        return decode_png_mask(archive.read(path), image_hw)

    return decode


def parse_masks(data: bytes, max_entry_bytes: int) -> list[IncomingLabel]:
    """The labels of a mask zip: the manifest's rows in order, each naming its PNG."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        manifest = archive.read(MANIFEST)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise invalid_file("mask zip", f"a zip with {MANIFEST} is expected ({exc})") from exc
    rows = _rows(manifest, MANIFEST, (_IMAGE_COLUMNS, {"mask"}))
    items: list[IncomingLabel] = []
    for line, row in enumerate(rows, start=2):
        path = (row.get("mask") or "").strip()
        try:
            size = archive.getinfo(path).file_size
        except KeyError:
            raise invalid_file("mask zip", f"{MANIFEST} line {line}: no entry {path!r}") from None
        if size > max_entry_bytes:
            raise invalid_file("mask zip", f"{path!r} is larger than {max_entry_bytes} bytes")
        ref = _ref(row, f"{MANIFEST} line {line}")
        items.append(IncomingLabel(ref, mask=_png_source(archive, path)))
    return items
