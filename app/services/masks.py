"""Binary masks: decoding (PNG upload or COCO RLE), validation, storage as 0/255 PNG.

A mask is a ``bool`` array ``[height, width]``. Stored masks are 8-bit grayscale PNGs with
values 0 and 255 under ``masks/<project_id>/<uuid>.png``; the file is written (temp then
rename) before its row is flushed, and deleted again if the transaction does not commit.
"""

from __future__ import annotations

import io
import uuid
import warnings
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from pycocotools import mask as mask_util
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from app.errors import InvalidInput
from app.schemas.labels import RleMask
from app.storage import Storage

Mask = NDArray[np.bool_]

# pycocotools 2.0.11's decoder predates NumPy 2's ``copy`` keyword; harmless, and noisy.
warnings.filterwarnings(
    "ignore", message=r"__array__ implementation", category=DeprecationWarning, module="pycocotools"
)

_FILES_KEY = "files_on_rollback"
_LISTENING_KEY = "files_on_rollback_listening"
_COMMITTED_KEY = "files_on_rollback_committed"


def _size_mismatch(got: tuple[int, int], want: tuple[int, int]) -> InvalidInput:
    return InvalidInput(
        f"The mask is {got[1]}x{got[0]} (width x height) but the image is "
        f"{want[1]}x{want[0]}; send a mask of the image's size.",
        code="MaskSizeMismatch",
    )


def _binary(values: NDArray[Any]) -> Mask:
    """``values`` as a bool mask; only {0, 1} or {0, 255} are binary."""
    present = set(np.unique(values).tolist())
    if present <= {0, 1}:
        return values.astype(bool)
    if present <= {0, 255}:
        return values == 255
    shown = sorted(present)[:6]
    raise InvalidInput(
        f"A mask holds only 0 and 1, or 0 and 255; this one holds {shown}"
        f"{' ...' if len(present) > 6 else ''}. Threshold it before sending.",
        code="MaskNotBinary",
    )


def _gray_values(image: PILImage.Image) -> NDArray[Any]:
    """The one channel of a mask image (colour channels must agree; alpha is ignored)."""
    if image.mode in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
        return np.asarray(image)
    if image.mode in ("LA", "RGB", "RGBA"):
        bands = np.asarray(image)
        colour = bands[..., :1] if image.mode == "LA" else bands[..., :3]
        if not (colour == colour[..., :1]).all():
            raise InvalidInput(
                "The mask has colours; send a grayscale PNG with 0/255 (or 0/1) values.",
                code="MaskNotBinary",
            )
        return colour[..., 0]
    raise InvalidInput(f"A mask PNG in mode {image.mode!r} is not supported.", code="InvalidMask")


def decode_png_mask(data: bytes, expected_hw: tuple[int, int]) -> Mask:
    """Decode an uploaded PNG mask of ``expected_hw`` = (height, width) pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
            if image.format != "PNG":
                raise InvalidInput("The mask file is not a PNG.", code="InvalidMask")
            got = (image.height, image.width)
            if got != expected_hw:
                raise _size_mismatch(got, expected_hw)
            image.load()
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombWarning) as exc:
        raise InvalidInput(
            f"The mask file cannot be read as a PNG: {exc}", code="InvalidMask"
        ) from exc
    return _binary(_gray_values(image))


def _rle_string_counts(counts: str) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``)."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("the RLE string ends inside a number")
            char = ord(counts[pos]) - 48
            if not 0 <= char < 64:
                raise ValueError(f"character {counts[pos]!r} is not valid in an RLE string")
            value |= (char & 0x1F) << (5 * shift)
            more = bool(char & 0x20)
            pos += 1
            shift += 1
            if not more and char & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_rle_mask(rle: RleMask, expected_hw: tuple[int, int]) -> Mask:
    """Decode a COCO RLE (``counts`` compressed str or uncompressed list) after checking it.

    The run lengths are validated first (non-negative, summing to height*width): pycocotools'
    C decoder trusts them and would write past its buffer otherwise.
    """
    height, width = rle.size
    if (height, width) != expected_hw:
        raise _size_mismatch((height, width), expected_hw)
    try:
        runs = rle.counts if isinstance(rle.counts, list) else _rle_string_counts(rle.counts)
    except ValueError as exc:
        raise InvalidInput(f"The RLE cannot be read: {exc}.", code="InvalidRle") from exc
    if any(r < 0 for r in runs) or sum(runs) != height * width:
        raise InvalidInput(
            f"The RLE's run lengths must be non-negative and add up to height*width = "
            f"{height * width}; they add up to {sum(runs)}.",
            code="InvalidRle",
        )
    if isinstance(rle.counts, list):
        encoded = mask_util.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    else:
        encoded = {"size": [height, width], "counts": rle.counts.encode("ascii")}
    decoded: NDArray[np.uint8] = mask_util.decode(encoded)
    return decoded.astype(bool)


def mask_to_rle(mask: Mask) -> dict[str, Any]:
    """The compressed COCO RLE of ``mask`` as JSON: ``{"size": [h, w], "counts": str}``."""
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}


def encode_png_mask(mask: Mask) -> bytes:
    """``mask`` as an 8-bit grayscale PNG holding 0 and 255."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
        buffer, format="PNG", optimize=False
    )
    return buffer.getvalue()


def store_mask(session: Session, storage: Storage, project_id: int, mask: Mask) -> str:
    """Write ``mask`` under a new key (deleted again if the session's transaction fails)."""
    key = f"masks/{project_id}/{uuid.uuid4().hex}.png"
    storage.put_bytes(key, encode_png_mask(mask))
    delete_on_rollback(session, storage, key)
    return key


def delete_on_rollback(session: Session, storage: Storage, key: str) -> None:
    """Delete file ``key`` when ``session``'s outermost transaction ends without a commit."""
    session.info.setdefault(_FILES_KEY, []).append((storage, key))
    if session.info.get(_LISTENING_KEY):
        return
    session.info[_LISTENING_KEY] = True

    def _after_commit(sess: Session) -> None:
        if sess.get_nested_transaction() is None:  # the outermost transaction, not a savepoint
            sess.info[_COMMITTED_KEY] = True

    def _after_transaction_end(sess: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is not None:
            return
        files: list[tuple[Storage, str]] = sess.info.pop(_FILES_KEY, [])
        if not sess.info.pop(_COMMITTED_KEY, False):
            for file_storage, file_key in files:
                file_storage.delete(file_key)

    event.listen(session, "after_commit", _after_commit)
    event.listen(session, "after_transaction_end", _after_transaction_end)
