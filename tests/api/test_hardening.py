"""Issue #14's findings (H1, H2, L1, L2, L4, Small, L6): each one's regression test.

SQLite and PostgreSQL, through the API, except where a unit is tested on its own.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_util
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.labels import masks
from app.labels.schemas import RleMask
from app.models import Image, Label, Project
from app.storage import Storage

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Headers = dict[str, str]
H, W = 24, 32  # make_image's default size


def _error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


def _labels(db: Session) -> int:
    return int(db.scalar(select(func.count(Label.id))) or 0)


def _import(client: TestClient, headers: Headers, project_id: int, fmt: str, data: bytes) -> Any:
    return client.post(
        f"/projects/{project_id}/import",
        params={"format": fmt},
        files={"file": (f"labels.{fmt}", io.BytesIO(data))},
        headers=headers,
    )


@pytest.fixture
def segmentation(
    make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> tuple[Project, Image]:
    project = make_project(task="segmentation", classes=["lesion"])
    return project, make_image(project)


# --- H1: COCO polygons are checked before pycocotools sees them ---------------------------------


def _zigzag(points: int) -> list[float]:
    """A polygon that crosses the image corner to corner ``points`` times (a long outline)."""
    xy = [[0.0, 0.0] if n % 2 else [float(W), float(H)] for n in range(points)]
    return [v for point in xy for v in point]


@pytest.mark.parametrize(
    "polygons",
    [
        pytest.param([[0, 0, 1e308, 0, 1e308, 1e308]], id="1e308"),  # segfaulted the API
        pytest.param([[0, 0, 1e5, 0, 1e5, 1e5]], id="far-outside"),
        pytest.param([[2, 2, 12, 2, 12, 10, 2, 10], [0, 0, W + 5, 0, 3, 3]], id="second-outside"),
        pytest.param([[-3, 2, 12, 2, 12, 10]], id="negative"),
        pytest.param([_zigzag(40_000)], id="outline-too-long"),
        pytest.param([[0, 0, 1, 1]], id="two-points"),
    ],
)
def test_coco_polygons_outside_the_image_are_refused(
    client: TestClient,
    db: Session,
    storage: Storage,
    segmentation: tuple[Project, Image],
    admin_headers: Headers,
    polygons: list[list[float]],
) -> None:
    project, image = segmentation
    coco = {
        "images": [{"id": 1, "file_name": image.filename, "sha256": image.sha256}],
        "categories": [{"id": 1, "name": "lesion"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"image_id": 1, "category_id": 1, "segmentation": polygons},
        ],
    }
    response = _import(client, admin_headers, project.id, "coco", json.dumps(coco).encode())

    assert _error(response) == (422, "InvalidPolygon"), response.text
    assert _labels(db) == 0  # all or nothing: the valid first entry is not stored either
    assert not list(storage.root.glob("masks/**/*.png"))


def test_coco_polygons_on_the_image_border_are_accepted() -> None:
    inside = masks.decode_polygons([[0, 0, W, 0, W, H, 0, H]], (H, W))
    assert inside.all()
    tolerated = masks.decode_polygons([[-0.5, -0.5, W + 0.5, 0, W + 0.5, H + 0.5]], (H, W))
    assert tolerated.shape == (H, W) and tolerated.any()
    with pytest.raises(InvalidInput) as raised:
        masks.decode_polygons([[0, 0, float("nan"), 0, 3, 3]], (H, W))
    assert raised.value.code == "InvalidPolygon"


# --- H2: RLE size capped by the pixel count, decoded before the write transaction -------------


def test_rle_string_runs_agree_with_pycocotools() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(1, 60, 2))
        mask = rng.random((height, width)) < rng.random()
        counts = masks.mask_to_rle(mask)["counts"].encode()
        runs = masks.rle_string_runs(counts)
        assert int(runs.sum()) == height * width
        assert len(counts) <= masks.max_rle_chars(height, width)
        decoded = mask_util.decode({"size": [height, width], "counts": counts})
        assert (decoded.astype(bool) == mask).all()
        flat = mask.flatten(order="F")
        starts = np.flatnonzero(np.diff(np.concatenate([[False], flat, [not flat[-1]]])))
        assert runs.tolist() == np.diff(np.concatenate([[0], starts])).tolist()
    for bad in (b"~", b"0\x00", b"1a", b"aaaaaa0"):  # bad character, cut off, 7 characters
        with pytest.raises(ValueError):
            masks.rle_string_runs(bad)


@pytest.mark.parametrize(
    "counts",
    [
        pytest.param("1" * (2 * H * W + 17), id="string"),
        pytest.param("1" * 1_900_000, id="string-1.9MB"),  # the probe sent 19 MB (10 s)
        pytest.param([1] * (H * W + 2), id="list"),
    ],
)
def test_an_rle_longer_than_the_pixel_count_allows_is_refused_unread(
    client: TestClient,
    db: Session,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    monkeypatch: pytest.MonkeyPatch,
    counts: Any,
) -> None:
    def never(_: bytes) -> Any:
        raise AssertionError("an over-long RLE string must be refused before it is read")

    monkeypatch.setattr(masks, "rle_string_runs", never)
    _, image = segmentation
    rle = {"size": [H, W], "counts": counts}
    body = {"image_id": image.id, "idempotency_key": "big", "mask_rle": rle}
    response = client.post("/labels", json=body, headers=annotator_headers)

    assert _error(response) == (422, "InvalidRle"), response.text
    assert "at most" in response.json()["detail"]
    assert _labels(db) == 0


def test_run_lengths_past_the_image_are_refused_before_pycocotools() -> None:
    """pycocotools' decoder trusts the runs: more than h*w would write past its buffer."""
    too_many = masks.mask_to_rle(np.ones((H, W + 1), bool))["counts"]
    for counts in (too_many, "0" * 10):
        with pytest.raises(InvalidInput) as raised:
            masks.decode_rle_mask(RleMask(size=(H, W), counts=counts), (H, W))
        assert raised.value.code == "InvalidRle"


@pytest.mark.parametrize("kind", ["rle", "png"])
def test_the_mask_is_decoded_before_the_write_transaction_begins(
    client: TestClient,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Decoding (and encoding the PNG to store) inside the transaction held SQLite's write lock
    for as long as it took."""
    from app.labels import endpoints as labels_router
    from app.labels import service as labels_service

    _, image = segmentation
    mask = np.zeros((H, W), bool)
    mask[4:9, 3:20] = True
    png = masks.encode_png_mask(mask)
    steps: list[str] = []

    def traced(step: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            steps.append(step)
            return function(*args)

        return call

    name = "decode_rle_mask" if kind == "rle" else "decode_png_mask"
    monkeypatch.setattr(labels_service, name, traced("decode", getattr(labels_service, name)))
    encode = traced("encode", masks.encode_png_mask)
    monkeypatch.setattr(masks, "encode_png_mask", encode)  # store_mask's own, if it encodes
    if hasattr(labels_service, "encode_png_mask"):
        monkeypatch.setattr(labels_service, "encode_png_mask", encode)
    unit_of_work = labels_router.in_unit_of_work

    async def in_unit_of_work(request: Any, work: Callable[[Session], Any]) -> Any:
        return await unit_of_work(request, traced("transaction", work))

    monkeypatch.setattr(labels_router, "in_unit_of_work", in_unit_of_work)
    if kind == "rle":
        body = {"image_id": image.id, "idempotency_key": "k", "mask_rle": masks.mask_to_rle(mask)}
        response = client.post("/labels", json=body, headers=annotator_headers)
    else:
        response = client.post(
            "/labels",
            data={"image_id": str(image.id), "idempotency_key": "k"},
            files={"mask": ("m.png", png, "image/png")},
            headers=annotator_headers,
        )

    assert response.status_code == 201, response.text
    assert steps == ["decode", "encode", "transaction"]
    stored = client.get(response.json()["mask_url"], headers=annotator_headers)
    assert (masks.decode_png_mask(stored.content, (H, W)) == mask).all()


# --- L1: integers past 64 bits are a client error, not a 500 ----------------------------------

BIG = 2**63


def _out_of_range_requests(project: Project, image: Image) -> list[tuple[str, str, dict[str, Any]]]:
    label = {"idempotency_key": "big", "class_index": 0}
    return [
        ("GET", f"/labels/{BIG}", {}),
        ("GET", f"/labels/{-BIG - 1}", {}),
        ("GET", f"/images/{BIG}/labels", {}),
        ("GET", f"/images/{BIG}/file", {}),
        ("GET", f"/projects/{BIG}", {}),
        ("PATCH", f"/projects/{BIG}", {"json": {"name": "x"}}),
        ("GET", f"/projects/{project.id}/images", {"params": {"offset": BIG}}),
        ("GET", "/queue", {"params": {"project_id": BIG}}),
        ("POST", f"/leases/{BIG}/renew", {}),
        ("GET", "/export", {"params": {"project_id": BIG}}),
        ("GET", f"/models/{BIG}", {}),
        ("GET", f"/rounds/{BIG}", {}),
        ("POST", "/rounds", {"json": {"project_id": BIG}}),
        ("GET", f"/projects/{BIG}/webhooks", {}),
        ("GET", f"/projects/{project.id}/webhooks/{BIG}/deliveries", {}),
        ("POST", "/labels", {"json": {**label, "image_id": BIG}}),
        ("POST", "/labels", {"json": {**label, "image_id": image.id, "lease_id": BIG}}),
    ]


def test_ids_past_64_bits_give_404_or_422(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    project = make_project()
    image = make_image(project)
    answers = {}
    for method, url, kwargs in _out_of_range_requests(project, image):
        response = client.request(method, url, headers=admin_headers, **kwargs)
        answers[f"{method} {url} {kwargs}"] = _error(response)
    wrong = {k: v for k, v in answers.items() if v[0] not in (404, 422)}
    assert not wrong
    assert _labels(db) == 0


# --- L2: a mask decompression bomb is a bad mask (422), not a 500 -----------------------------


def _png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A 1-bit all-black PNG of ``width x height`` pixels: about 110 KB, 112 MB unpacked."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    return _png_bomb()


def test_a_mask_png_bomb_on_post_labels_is_refused(
    client: TestClient,
    db: Session,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    png_bomb: bytes,
) -> None:
    _, image = segmentation
    response = client.post(
        "/labels",
        data={"image_id": str(image.id), "idempotency_key": "bomb"},
        files={"mask": ("bomb.png", png_bomb, "image/png")},
        headers=annotator_headers,
    )
    assert _error(response) == (422, "InvalidMask"), response.text
    assert _labels(db) == 0


def test_a_mask_png_bomb_in_a_masks_zip_is_refused(
    client: TestClient,
    db: Session,
    segmentation: tuple[Project, Image],
    admin_headers: Headers,
    png_bomb: bytes,
) -> None:
    import zipfile

    from app.exports.tabular import MANIFEST

    project, image = segmentation
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("masks/bomb.png", png_bomb)
        archive.writestr(MANIFEST, f"sha256,mask\n{image.sha256},masks/bomb.png\n")
    response = _import(client, admin_headers, project.id, "masks", buffer.getvalue())

    assert _error(response) == (422, "InvalidMask"), response.text
    assert _labels(db) == 0


# --- Small: palette PNG masks are read by colour, not as grey levels ----------------------------


def _palette_png(mask: np.ndarray, index: int) -> bytes:
    from PIL import Image as PILImage

    image = PILImage.fromarray(np.where(mask, index, 0).astype(np.uint8), mode="P")
    # Pascal VOC's first colours: black, dark red, dark green, olive (index 3).
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _drawn() -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[3:11, 6:22] = True
    return mask


def test_a_palette_png_mask_is_read_by_its_colours(
    client: TestClient, segmentation: tuple[Project, Image], annotator_headers: Headers
) -> None:
    _, image = segmentation
    response = client.post(
        "/labels",
        data={"image_id": str(image.id), "idempotency_key": "palette"},
        files={"mask": ("m.png", _palette_png(_drawn(), 3), "image/png")},
        headers=annotator_headers,
    )
    assert response.status_code == 201, response.text
    stored = client.get(response.json()["mask_url"], headers=annotator_headers)
    assert (masks.decode_png_mask(stored.content, (H, W)) == _drawn()).all()


def test_the_importer_reads_a_palette_png_mask_by_its_colours() -> None:
    from app.images.service import normalise_mask

    png = normalise_mask("m.png", _palette_png(_drawn(), 3), (W, H), 10_000)
    assert (masks.decode_png_mask(png, (H, W)) == _drawn()).all()


# --- L4: the same idempotency key with another payload is refused, not answered 200 ----------


@pytest.fixture
def classification(
    make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> tuple[Project, Image]:
    project = make_project(classes=["benign", "malignant", "other"])
    return project, make_image(project)


def test_a_reused_key_with_another_class_is_a_conflict(
    client: TestClient,
    db: Session,
    classification: tuple[Project, Image],
    annotator_headers: Headers,
) -> None:
    _, image = classification
    body = {"image_id": image.id, "idempotency_key": "k", "class_index": 1}
    first = client.post("/labels", json=body, headers=annotator_headers)
    assert first.status_code == 201, first.text

    same = client.post("/labels", json=body, headers=annotator_headers)
    by_name = {"image_id": image.id, "idempotency_key": "k", "class_name": "malignant"}
    same_by_name = client.post("/labels", json=by_name, headers=annotator_headers)
    assert (same.status_code, same_by_name.status_code) == (200, 200)
    assert same.json() == same_by_name.json() == first.json()

    for changed in ({"class_index": 2}, {"class_name": "benign"}):
        body = {"image_id": image.id, "idempotency_key": "k", **changed}
        response = client.post("/labels", json=body, headers=annotator_headers)
        assert _error(response) == (409, "IdempotencyKeyReused"), changed
    assert _labels(db) == 1


def test_a_reused_key_with_another_mask_is_a_conflict(
    client: TestClient,
    db: Session,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
) -> None:
    _, image = segmentation
    mask = _drawn()
    body = {"image_id": image.id, "idempotency_key": "m", "mask_rle": masks.mask_to_rle(mask)}
    first = client.post("/labels", json=body, headers=annotator_headers)
    assert first.status_code == 201, first.text

    again = client.post("/labels", json=body, headers=annotator_headers)
    as_png = client.post(
        "/labels",
        data={"image_id": str(image.id), "idempotency_key": "m"},
        files={"mask": ("m.png", masks.encode_png_mask(mask), "image/png")},
        headers=annotator_headers,
    )
    assert (again.status_code, as_png.status_code) == (200, 200)
    assert again.json() == as_png.json() == first.json()

    moved = np.roll(mask, 1, axis=1)
    body["mask_rle"] = masks.mask_to_rle(moved)
    response = client.post("/labels", json=body, headers=annotator_headers)
    assert _error(response) == (409, "IdempotencyKeyReused")
    assert _labels(db) == 1


# --- Small: HEAD on GET routes, nosniff on every response --------------------------------------


def test_head_answers_like_get_without_a_body(
    client: TestClient,
    classification: tuple[Project, Image],
    annotator_headers: Headers,
) -> None:
    project, image = classification
    urls = ["/health", f"/images/{image.id}", f"/images/{image.id}/file", f"/projects/{project.id}"]
    for url in urls:
        get = client.get(url, headers=annotator_headers)
        head = client.head(url, headers=annotator_headers)
        assert (head.status_code, get.status_code) == (200, 200), url
        assert head.content == b"", url
        assert head.headers["content-type"] == get.headers["content-type"], url
        assert head.headers["content-length"] == str(len(get.content)), url
    missing = client.head("/images/999999", headers=annotator_headers)
    assert missing.status_code == 404 and missing.content == b""
    assert client.head("/images/1").status_code == 401  # still authenticated
    post_only = client.head("/leases/1/renew", headers=annotator_headers)
    assert post_only.status_code == 405


def test_every_response_says_nosniff(
    client: TestClient, classification: tuple[Project, Image], annotator_headers: Headers
) -> None:
    _, image = classification
    responses = [
        client.get("/health"),
        client.get(f"/images/{image.id}/file", headers=annotator_headers),
        client.get("/images/999999", headers=annotator_headers),  # 404
        client.get(f"/images/{image.id}"),  # 401
        client.post("/labels", json={}, headers=annotator_headers),  # 422
        client.get("/openapi.json"),
    ]
    for response in responses:
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url


def test_only_the_drivers_integer_overflow_is_a_client_error() -> None:
    from sqlalchemy.exc import DataError

    from app.errors import is_number_out_of_range

    assert is_number_out_of_range(
        OverflowError("Python int too large to convert to SQLite INTEGER")
    )
    assert not is_number_out_of_range(OverflowError("math range error"))  # a bug: still a 500

    from asyncpg.exceptions import DataError as AsyncpgDataError
    from psycopg.errors import NumericValueOutOfRange

    assert is_number_out_of_range(DataError("x", {}, NumericValueOutOfRange("bigint")))
    assert not is_number_out_of_range(DataError("x", {}, ValueError("other")))
    # asyncpg (the API's hot paths on PostgreSQL) refuses the parameter before sending it.
    refused = AsyncpgDataError("invalid input for query argument $1: 2147483648")
    refused.__cause__ = OverflowError("value out of int32 range")
    assert is_number_out_of_range(DataError("x", {}, refused))
    other = AsyncpgDataError("invalid input for query argument $1: 'x'")
    other.__cause__ = ValueError("an integer is required")
    assert not is_number_out_of_range(DataError("x", {}, other))


# --- L6: what a killed process left in storage is swept at start-up ---------------------------


def test_orphan_files_are_swept_at_start_up(
    app: Any,
    client: TestClient,
    storage: Storage,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
) -> None:
    import os
    import time
    import uuid

    project, image = segmentation
    body = {
        "image_id": image.id,
        "idempotency_key": "kept",
        "mask_rle": masks.mask_to_rle(_drawn()),
    }
    label = client.post("/labels", json=body, headers=annotator_headers)
    assert label.status_code == 201, label.text
    in_use = next(storage.root.glob(f"masks/{project.id}/*.png"))

    def leftover(key: str) -> Any:
        path = storage.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG partial")
        return path

    hours_ago = time.time() - 2 * 3600
    orphans = [
        leftover(f"masks/{project.id}/.tmp-k1ll3d.png"),  # a write cut short
        leftover(f"masks/{project.id}/{uuid.uuid4().hex}.png"),  # written, its row never was
        leftover(f"images/{project.id}/.tmp-abc.png"),
    ]
    kept = [
        in_use,
        leftover(f"masks/{project.id}/{uuid.uuid4().hex}.png"),  # recent: maybe in a transaction
        leftover("predictions/7/1.png"),  # the worker's, not swept
    ]
    for path in [*orphans, in_use, kept[2]]:
        os.utime(path, (hours_ago, hours_ago))

    with TestClient(app):  # a restart: the start-up sweeps
        pass

    assert [p for p in orphans if p.exists()] == []
    assert all(p.exists() for p in kept)
    mask = client.get(label.json()["mask_url"], headers=annotator_headers)
    assert (masks.decode_png_mask(mask.content, (H, W)) == _drawn()).all()
