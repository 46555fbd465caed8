"""COCO JSON: export and import.

``categories`` are the project's classes (``id`` = class index + 1). A mask label is an
annotation with ``category_id`` 1, ``iscrowd`` 0, ``segmentation`` a compressed RLE
(pycocotools), and ``area`` and ``bbox`` ([x, y, w, h]) computed from the mask; a class label
is an annotation with only ``category_id`` (COCO has no image-level class; this is ours).
Images carry ``coreloop_image_id`` and ``sha256`` for matching on import. Import also reads
uncompressed RLE and polygons; each annotation is one label, in file order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput
from app.exports.importing import ImageRef, IncomingLabel, MaskSource, invalid_file
from app.exports.rows import (
    Consensus,
    ProjectSnapshot,
    consensus_mask,
    iter_rows,
    read_mask,
)
from app.exports.schemas import CONSENSUS, CocoFile
from app.labels.masks import Mask, decode_polygons, decode_rle_mask, mask_to_rle
from app.labels.schemas import RleMask
from app.models import Image, Label
from app.storage import Storage


def bbox_of(mask: Mask) -> list[float]:
    """COCO's ``[x, y, width, height]`` of the mask's pixels; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def _annotation(storage: Storage, image: Image, label: Label) -> dict[str, Any]:
    out: dict[str, Any] = {"id": label.id, "image_id": image.id, "iscrowd": 0}
    if label.class_index is not None:
        out["category_id"] = label.class_index + 1
    else:
        assert label.mask_key is not None
        mask = read_mask(storage, label.mask_key, image)
        out.update(
            category_id=1,
            segmentation=mask_to_rle(mask),
            area=int(mask.sum()),
            bbox=bbox_of(mask),
        )
    out.update(
        coreloop_author=label.author_name,
        coreloop_source=label.source,
        created_at=label.created_at.isoformat(),
    )
    return out


def _consensus(
    storage: Storage, snap: ProjectSnapshot, image: Image, consensus: Consensus
) -> dict[str, Any]:
    """The readers' consensus (importing skips it); its id follows every label id."""
    out: dict[str, Any] = {"id": snap.max_label_id + image.id, "image_id": image.id, "iscrowd": 0}
    if consensus.class_index is not None:
        out["category_id"] = consensus.class_index + 1
    else:
        mask = consensus_mask(storage, consensus, image)
        out.update(category_id=1, segmentation=mask_to_rle(mask), area=int(mask.sum()),
                   bbox=bbox_of(mask))  # fmt: skip
    out.update(coreloop_source=CONSENSUS, coreloop_state=consensus.state,
               coreloop_reads=list(consensus.label_ids))  # fmt: skip
    return out


def _image(image: Image) -> dict[str, Any]:
    return {
        "id": image.id,
        "file_name": image.filename,
        "width": image.width,
        "height": image.height,
        "coreloop_image_id": image.id,
        "sha256": image.sha256,
        "split": image.split,
    }


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def export_coco(
    sessions: sessionmaker[Session], storage: Storage, snap: ProjectSnapshot, *, history: bool
) -> Iterator[bytes]:
    """One COCO JSON document, written in two passes over the pages: images, then labels."""
    head = {
        "info": {
            "description": f"coreloop project {snap.name}",
            "date_created": datetime.now(UTC).isoformat(),
            "coreloop_project_id": snap.id,
            "history": history,
        },
        "licenses": [],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(snap.classes)],
    }
    yield _dump(head)[:-1] + b',"images":['
    separator = b"\n"
    for row in iter_rows(sessions, snap, history=history, labels=False):
        yield separator + _dump(_image(row.image))
        separator = b",\n"
    yield b'],"annotations":['
    separator = b"\n"
    for row in iter_rows(sessions, snap, history=history):
        for label in row.labels:
            yield separator + _dump(_annotation(storage, row.image, label))
            separator = b",\n"
        if row.consensus is not None:
            yield separator + _dump(_consensus(storage, snap, row.image, row.consensus))
            separator = b",\n"
    yield b"]}\n"


def _segmentation_source(segmentation: dict[str, Any] | list[list[float]]) -> MaskSource:
    def decode(image_hw: tuple[int, int]) -> Mask:
        if isinstance(segmentation, dict):
            try:
                rle = RleMask.model_validate(segmentation)
            except ValidationError as exc:
                raise InvalidInput(f"Not a COCO RLE: {exc}.", code="InvalidRle") from exc
            return decode_rle_mask(rle, image_hw)
        return decode_polygons(segmentation, image_hw)  # checked before pycocotools sees it

    return decode


def parse_coco(data: bytes) -> list[IncomingLabel]:
    """The labels of a COCO file: one per annotation, in file order."""
    try:
        coco = CocoFile.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise invalid_file("COCO", f"{exc.error_count()} problem(s), first: {first}") from exc
    images = {image.id: image for image in coco.images}
    names = {category.id: category.name for category in coco.categories}
    items: list[IncomingLabel] = []
    for n, annotation in enumerate(coco.annotations):
        if annotation.coreloop_source == CONSENSUS:
            continue  # derived from the reads, which are imported themselves
        image = images.get(annotation.image_id)
        if image is None:
            raise invalid_file(
                "COCO",
                f"annotation {n} is for image {annotation.image_id}, which 'images' does not list",
            )
        ref = ImageRef(image.coreloop_image_id, image.sha256, image.file_name)
        if annotation.segmentation:
            items.append(IncomingLabel(ref, mask=_segmentation_source(annotation.segmentation)))
        elif annotation.category_id in names:
            items.append(IncomingLabel(ref, class_name=names[annotation.category_id]))
        else:
            raise invalid_file(
                "COCO",
                f"annotation {n} has category {annotation.category_id}, "
                "which 'categories' does not list",
            )
    return items
