"""Label Studio task JSON: export (with predictions) and import.

A task per image: ``data`` holds the image URL, ``coreloop_image_id``, ``sha256`` and
``filename``; each label is an annotation with one result, a ``choices`` (classification) or a
``brushlabels`` in Label Studio's brush RLE (segmentation,
``app.integrations.labelstudio.rle``); the model's outputs are ``predictions``
(``model_version`` ``model-<id>``, ``score`` the top class probability).

Import reads each non-cancelled annotation as one label: its first ``choices``, or the union of
its ``brushlabels`` masks. Tasks exported by Label Studio itself match by file name (the
``/data/upload/<n>/<8 hex>-`` prefix of uploaded files is removed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import InvalidInput
from app.exports.importing import (
    ImageRef,
    IncomingLabel,
    MaskSource,
    invalid_file,
    size_mismatch,
)
from app.exports.rows import (
    Consensus,
    ProjectSnapshot,
    consensus_mask,
    iter_rows,
    read_mask,
)
from app.exports.schemas import CONSENSUS, LsAnnotation, LsResult, LsTask
from app.integrations.labelstudio import rle as lsrle
from app.labels.masks import Mask
from app.models import Image, Label, Prediction
from app.storage import Storage

_TASKS = TypeAdapter(list[LsTask])
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
_OUR_IMAGE_URL = re.compile(r"/images/\d+/file$")


def _choice(name: str) -> dict[str, Any]:
    return {
        "from_name": "choice",
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [name]},
    }


def _brush(mask: Mask, name: str) -> dict[str, Any]:
    height, width = mask.shape
    return {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": lsrle.encode_mask(mask), "brushlabels": [name]},
    }


def _annotation(storage: Storage, snap: ProjectSnapshot, image: Image, label: Label) -> Any:
    if label.class_index is not None:
        result = _choice(snap.class_name(label.class_index))
    else:
        assert label.mask_key is not None  # rows carry only labels with a class or a mask
        result = _brush(read_mask(storage, label.mask_key, image), snap.class_name(0))
    return {
        "id": label.id,
        "created_at": label.created_at.isoformat(),
        "coreloop_author": label.author_name,
        "coreloop_source": label.source,
        "result": [{"id": f"coreloop-{label.id}", **result}],
    }


def _consensus_annotation(
    storage: Storage, snap: ProjectSnapshot, image: Image, consensus: Consensus
) -> Any:
    """The readers' consensus as Label Studio's ground-truth annotation (importing skips it)."""
    if consensus.class_index is not None:
        result = _choice(snap.class_name(consensus.class_index))
    else:
        result = _brush(consensus_mask(storage, consensus, image), snap.class_name(0))
    return {
        "id": -image.id,
        "ground_truth": True,
        "coreloop_source": CONSENSUS,
        "coreloop_state": consensus.state,
        "coreloop_reads": list(consensus.label_ids),
        "result": [{"id": f"coreloop-consensus-{image.id}", **result}],
    }


def _prediction(storage: Storage, snap: ProjectSnapshot, image: Image, p: Prediction) -> Any:
    out: dict[str, Any] = {"model_version": f"model-{p.model_version_id}"}
    if p.class_probs:
        best = int(np.argmax(p.class_probs))
        out.update(score=float(p.class_probs[best]), result=[_choice(snap.class_name(best))])
    elif p.mask_key is not None:
        out["result"] = [_brush(read_mask(storage, p.mask_key, image), snap.class_name(0))]
    else:
        return None
    return out


def export_ls(
    sessions: sessionmaker[Session],
    storage: Storage,
    snap: ProjectSnapshot,
    *,
    history: bool,
    base_url: str,
) -> Iterator[bytes]:
    """A JSON list of tasks, one per image (labeled or not), written a task at a time."""
    yield b"["
    separator = b"\n"
    for row in iter_rows(sessions, snap, history=history, predictions=True):
        image = row.image
        predictions = [_prediction(storage, snap, image, p) for p in row.predictions]
        task = {
            "id": image.id,
            "data": {
                "image": f"{base_url.rstrip('/')}/images/{image.id}/file",
                "coreloop_image_id": image.id,
                "sha256": image.sha256,
                "filename": image.filename,
            },
            "annotations": [_annotation(storage, snap, image, label) for label in row.labels]
            + (
                [_consensus_annotation(storage, snap, image, row.consensus)]
                if row.consensus is not None
                else []
            ),
            "predictions": [p for p in predictions if p is not None],
        }
        yield separator + json.dumps(task, separators=(",", ":")).encode()
        separator = b",\n"
    yield b"\n]\n"


def _image_ref(data: dict[str, Any]) -> ImageRef:
    raw_id = data.get("coreloop_image_id")
    image_id = int(raw_id) if isinstance(raw_id, int | str) and str(raw_id).isdigit() else None
    sha256 = data.get("sha256") if isinstance(data.get("sha256"), str) else None
    filename = data.get("filename") if isinstance(data.get("filename"), str) else None
    url = data.get("image")
    if filename is None and isinstance(url, str) and not _OUR_IMAGE_URL.search(url):
        base = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        filename = _UPLOAD_PREFIX.sub("", base) or None
    return ImageRef(image_id=image_id, sha256=sha256, filename=filename)


def _brush_source(brushes: list[LsResult]) -> MaskSource:
    def decode(image_hw: tuple[int, int]) -> Mask:
        mask = np.zeros(image_hw, dtype=bool)
        for brush in brushes:
            hw = (brush.original_height or image_hw[0], brush.original_width or image_hw[1])
            if hw != image_hw:
                raise size_mismatch(hw, image_hw)
            try:
                mask |= lsrle.decode_mask(brush.value.rle or [], hw[1], hw[0])
            except ValueError as exc:
                raise InvalidInput(
                    f"A brush RLE cannot be read: {exc}.", code="InvalidRle"
                ) from exc
        return mask

    return decode


def _incoming(ref: ImageRef, annotation: LsAnnotation) -> IncomingLabel | None:
    brushes = [r for r in annotation.result if r.type == "brushlabels" and r.value.rle is not None]
    if brushes:
        return IncomingLabel(ref, mask=_brush_source(brushes))
    for result in annotation.result:
        if result.type == "choices" and result.value.choices:
            return IncomingLabel(ref, class_name=result.value.choices[0])
    return None


def parse_ls(data: bytes) -> list[IncomingLabel]:
    """The labels of a Label Studio JSON export (a list of tasks, or one task)."""
    try:
        raw = json.loads(data)
        tasks = _TASKS.validate_python(raw if isinstance(raw, list) else [raw])
    except (ValueError, ValidationError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise invalid_file("Label Studio", f"not a list of tasks ({exc})") from exc
    items: list[IncomingLabel] = []
    for task in tasks:
        ref = _image_ref(task.data)
        for annotation in task.annotations:
            if annotation.coreloop_source == CONSENSUS:
                continue  # derived from the reads, which are imported themselves
            if not annotation.was_cancelled and (item := _incoming(ref, annotation)):
                items.append(item)
    return items
