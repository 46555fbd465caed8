"""Binary masks: decoding (PNG upload or COCO RLE), validation, storage as 0/255 PNG.

A mask is a ``bool`` array ``[height, width]``. Stored masks are 8-bit grayscale PNGs with
values 0 and 255 under ``masks/<project_id>/<uuid>.png``; the file is written (temp then
rename) before its row is flushed, and deleted again if the transaction does not commit;
what a killed process leaves behind is swept at start-up (:func:`sweep_orphan_files`).
"""

from __future__ import annotations

import io
import logging
import time
import uuid
import warnings
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image as PILImage
from pycocotools import mask as mask_util
from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from app.errors import InvalidInput
from app.labels.schemas import RleMask
from app.models import Label
from app.storage import Storage

Mask = NDArray[np.bool_]
log = logging.getLogger(__name__)

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


def palette_foreground(image: PILImage.Image) -> Mask:
    """A palette ("P"/"PA") mask: lesion where the pixel's palette colour is not black.

    Palette PNGs are label maps (index 0 black background, other indices coloured classes, as
    in Pascal VOC), so their pixel values are palette indices, not intensities: reading the
    indices as grey levels refused (or, thresholded, emptied) a mask drawn with index 3. What
    counts is the colour that is shown: black is background, any other colour lesion (alpha
    is ignored, as for the other modes).
    """
    rgb: NDArray[np.uint8] = np.asarray(image.convert("RGB"))
    return np.asarray(rgb.any(axis=-1))


def _gray_values(image: PILImage.Image) -> NDArray[Any]:
    """The one channel of a mask image (colour channels must agree; alpha is ignored)."""
    if image.mode in ("P", "PA"):
        return palette_foreground(image)
    if image.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L"):
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
    except (
        OSError,
        ValueError,
        SyntaxError,
        PILImage.DecompressionBombWarning,
        PILImage.DecompressionBombError,  # not an OSError: raised by open() past 2x the limit
    ) as exc:
        raise InvalidInput(
            f"The mask file cannot be read as a PNG: {exc}", code="InvalidMask"
        ) from exc
    return _binary(_gray_values(image))


# A compressed RLE string holds at most one run per pixel (and a leading zero run); each run
# takes one character when short, and the characters of long runs are paid for by the pixels
# they cover (a run of r pixels needs at most 1 + bit_length(r) / 5 characters). So a valid
# string of an h x w mask is shorter than 2 * h * w + 16 characters; anything longer is refused
# before it is read.
_RLE_CHARS_PER_PIXEL = 2
_RLE_CHARS_SLACK = 16
# pycocotools' C reader (rleFrString) accumulates a number's 5-bit groups in a C ``int``: up to
# 6 groups (30 bits, runs below 2**29 pixels) it reads what this module reads.
_RLE_MAX_GROUPS = 6


def max_rle_chars(height: int, width: int) -> int:
    """The longest compressed RLE string a valid ``height x width`` mask can have."""
    return _RLE_CHARS_PER_PIXEL * height * width + _RLE_CHARS_SLACK


def rle_string_runs(counts: bytes) -> NDArray[np.int64]:
    """Run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``), in NumPy.

    Only for checking the string before pycocotools decodes it: malformed input raises
    ``ValueError`` (bad characters, a number cut off or longer than 6 characters).
    """
    codes = np.frombuffer(counts, dtype=np.uint8) - np.uint8(48)  # below '0' wraps past 63
    if codes.size == 0:
        return codes.astype(np.int64)
    if int(codes.max()) >= 64:
        bad = int(np.flatnonzero(codes >= 64)[0])
        raise ValueError(f"character {chr(counts[bad])!r} is not valid in an RLE string")
    ends = np.flatnonzero((codes & 0x20) == 0)  # the last character of each number
    if ends.size == 0 or ends[-1] != codes.size - 1:
        raise ValueError("the RLE string ends inside a number")
    lengths = np.diff(ends, prepend=-1)
    if int(lengths.max()) > _RLE_MAX_GROUPS:
        raise ValueError(f"a run length has more than {_RLE_MAX_GROUPS} characters")
    # 5 bits per character, least significant first: start from each number's last character
    # and add the earlier ones, only for the (few) numbers that have them.
    payload = codes & np.uint8(0x1F)
    shift = 5 * (lengths - 1)
    values = payload[ends].astype(np.int64) << shift
    longer = np.flatnonzero(lengths > 1)
    k = 1
    while longer.size:
        values[longer] |= payload[ends[longer] - k].astype(np.int64) << (shift[longer] - 5 * k)
        longer = longer[lengths[longer] > k + 1]
        k += 1
    negative = (codes[ends] & 0x10) != 0  # sign bit of the last character
    values[negative] -= np.int64(1) << (5 * lengths[negative])
    # Numbers from the fourth on are deltas to the run two before (rleFrString's ``m > 2``).
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def _rle_runs(rle: RleMask, height: int, width: int) -> NDArray[np.int64]:
    """The run lengths of ``rle``, refused (``InvalidRle``) when they cannot be a valid mask."""
    counts = rle.counts
    limit = height * width + 1 if isinstance(counts, list) else max_rle_chars(height, width)
    if len(counts) > limit:
        what = "runs" if isinstance(counts, list) else "characters"
        raise InvalidInput(
            f"The RLE has {len(counts)} {what}; a {width}x{height} mask has at most {limit}.",
            code="InvalidRle",
        )
    try:
        if isinstance(counts, list):
            return np.asarray(counts, dtype=np.int64)
        return rle_string_runs(counts.encode("ascii"))
    except (ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInput(f"The RLE cannot be read: {exc}.", code="InvalidRle") from exc


def decode_rle_mask(rle: RleMask, expected_hw: tuple[int, int]) -> Mask:
    """Decode a COCO RLE (``counts`` compressed str or uncompressed list) after checking it.

    Its size is checked against the image first, the length of ``counts`` against the pixel
    count (so a huge string is refused before it is read), then the run lengths (non-negative,
    summing to height*width): pycocotools' C decoder, which does the decoding, trusts them and
    would write past its buffer otherwise.
    """
    height, width = rle.size
    if (height, width) != expected_hw:
        raise _size_mismatch((height, width), expected_hw)
    runs = _rle_runs(rle, height, width)
    total = int(runs.sum())
    if (runs.size and int(runs.min()) < 0) or total != height * width:
        raise InvalidInput(
            f"The RLE's run lengths must be non-negative and add up to height*width = "
            f"{height * width}; they add up to {total}.",
            code="InvalidRle",
        )
    if isinstance(rle.counts, list):
        encoded = mask_util.frPyObjects(
            {"size": [height, width], "counts": runs.tolist()}, height, width
        )
    else:
        encoded = {"size": [height, width], "counts": rle.counts.encode("ascii")}
    decoded: NDArray[np.uint8] = mask_util.decode(encoded)
    return decoded.astype(bool)


# Polygons (COCO import): every vertex inside the image, give or take this many pixels.
POLYGON_TOLERANCE = 1.0
# pycocotools rasterises a polygon by walking its outline at 5x resolution, allocating 16 bytes
# per step: at most this many pixels of outline (plus one per vertex) per annotation.
MAX_POLYGON_OUTLINE = 1_000_000


def _invalid_polygon(detail: str) -> InvalidInput:
    return InvalidInput(f"Invalid COCO polygon: {detail}.", code="InvalidPolygon")


def decode_polygons(polygons: list[list[float]], expected_hw: tuple[int, int]) -> Mask:
    """The mask of COCO ``polygons`` (``[[x, y, x, y, ...], ...]``) on a ``(height, width)`` image.

    Checked before pycocotools sees them (its rasteriser trusts the coordinates: a vertex at
    1e308 makes it allocate many gigabytes): at least 3 points each, finite coordinates within
    the image (``POLYGON_TOLERANCE``), outline at most ``MAX_POLYGON_OUTLINE`` pixels.
    """
    height, width = expected_hw
    if not polygons:
        raise _invalid_polygon("no polygon")
    outline = 0
    checked: list[list[float]] = []
    for n, polygon in enumerate(polygons):
        if len(polygon) < 6 or len(polygon) % 2:
            raise _invalid_polygon(
                f"polygon {n} has {len(polygon)} numbers; it needs at least 3 points (x, y pairs)"
            )
        if len(polygon) > 2 * MAX_POLYGON_OUTLINE:
            raise _invalid_polygon(f"polygon {n} has more than {MAX_POLYGON_OUTLINE} points")
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        if not np.isfinite(xy).all():
            raise _invalid_polygon(f"polygon {n} has a coordinate that is not a finite number")
        low, high = xy.min(axis=0), xy.max(axis=0)
        tol = POLYGON_TOLERANCE
        if low.min() < -tol or high[0] > width + tol or high[1] > height + tol:
            raise _invalid_polygon(
                f"polygon {n} reaches ({high[0]:g}, {high[1]:g}) / ({low[0]:g}, {low[1]:g}), "
                f"outside the {width}x{height} image"
            )
        steps = np.abs(np.diff(xy, axis=0, append=xy[:1])).max(axis=1)
        outline += int(np.ceil(steps).sum()) + len(xy)
        if outline > MAX_POLYGON_OUTLINE:
            raise _invalid_polygon(f"the outline is longer than {MAX_POLYGON_OUTLINE} pixels")
        checked.append(xy.ravel().tolist())
    rles = mask_util.frPyObjects(checked, height, width)
    decoded: NDArray[np.uint8] = mask_util.decode(mask_util.merge(rles))
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


# A file younger than this may belong to a transaction still running (in this process or
# another: the worker, a second API process, a long import), so the start-up sweep keeps it.
SWEEP_GRACE_SECONDS = 3600.0


def sweep_orphan_files(
    sessions: sessionmaker[Session], storage: Storage, grace_seconds: float = SWEEP_GRACE_SECONDS
) -> list[str]:
    """Delete what a killed process left behind in storage; returns what was deleted.

    Files are written before their row, and deleted again if the transaction fails, but a
    SIGKILL between the two leaves them: partial ``.tmp-*`` files of any write, and label mask
    files (``masks/<project>/...png``) that no label row refers to. Only files older than
    ``grace_seconds`` go, so that a write or transaction in progress elsewhere keeps its files.
    """
    older_than = time.time() - grace_seconds
    removed = [str(path) for path in storage.sweep_temp_files(older_than)]
    masks_dir = storage.root / "masks"
    if not masks_dir.is_dir():
        return removed
    for project_dir in sorted(masks_dir.iterdir()):
        if not (project_dir.is_dir() and project_dir.name.isdigit() and len(project_dir.name) < 19):
            continue
        stale = [p.name for p in project_dir.glob("*.png") if p.stat().st_mtime < older_than]
        if not stale:
            continue
        with sessions() as session:
            used = set(
                session.scalars(
                    select(Label.mask_key).where(
                        Label.project_id == int(project_dir.name), Label.mask_key.is_not(None)
                    )
                )
            )
        for name in stale:
            key = f"masks/{project_dir.name}/{name}"
            if key not in used:
                storage.delete(key)
                removed.append(key)
    if removed:
        log.warning("deleted %d orphan file(s) left in storage: %s", len(removed), removed[:20])
    return removed


def store_mask(
    session: Session, storage: Storage, project_id: int, mask: Mask, png: bytes | None = None
) -> str:
    """Write ``mask`` under a new key (deleted again if the session's transaction fails).

    ``png``: ``encode_png_mask(mask)``, when the caller encoded it already (outside the
    transaction)."""
    key = f"masks/{project_id}/{uuid.uuid4().hex}.png"
    storage.put_bytes(key, png if png is not None else encode_png_mask(mask))
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


def read_stored_mask(storage: Storage, key: str, hw: tuple[int, int]) -> Mask:
    """A stored mask (a label's or a prediction's) as a bool array [height, width]."""
    return decode_png_mask(storage.read_bytes(key), hw)


def dice_iou(a: Mask, b: Mask) -> tuple[float, float]:
    """Dice and IoU of two masks; two empty masks agree perfectly (1, 1)."""
    inter = float(np.logical_and(a, b).sum())
    total = float(a.sum() + b.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)
