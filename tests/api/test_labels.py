"""POST /labels, label history and masks, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.labels.masks import mask_to_rle
from app.labels.schemas import LabelCreate
from app.labels.service import create_label
from app.models import Event, Image, Label, Lease, Project, QueueItem, Role, User, utcnow
from app.settings import Settings
from app.storage import Storage
from tests.api.test_queue import add_items, add_round, get_queue

# pycocotools 2.0.11 on NumPy 2 (app.labels.masks silences it outside pytest).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Headers = dict[str, str]
H, W = 24, 32  # the make_image default size


def _headers(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _disc(height: int = H, width: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.asarray((yy - height / 2) ** 2 + (xx - width / 3) ** 2 <= 49)


def _post(client: TestClient, headers: Headers, **body: Any) -> Any:
    return client.post("/labels", json=body, headers=headers)


def _error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


@pytest.fixture
def classification(
    make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> tuple[Project, Image]:
    project = make_project(classes=["benign", "malignant", "other"])
    return project, make_image(project)


@pytest.fixture
def segmentation(
    make_project: Callable[..., Project], make_image: Callable[..., Image]
) -> tuple[Project, Image]:
    project = make_project(task="segmentation", classes=["lesion"])
    return project, make_image(project)


def test_class_label_by_index_and_by_name(
    client: TestClient, classification: tuple[Project, Image], annotator_headers: Headers
) -> None:
    project, image = classification
    by_index = _post(
        client, annotator_headers, image_id=image.id, idempotency_key="a", class_index=2
    )
    by_name = _post(
        client, annotator_headers, image_id=image.id, idempotency_key="b", class_name="malignant"
    )
    assert by_index.status_code == 201, by_index.text
    body = by_index.json()
    assert (body["class_index"], body["class_name"], body["source"]) == (2, "other", "human")
    assert (body["author_name"], body["project_id"], body["mask_url"]) == (
        "annotator",
        project.id,
        None,
    )
    assert (by_name.status_code, by_name.json()["class_index"]) == (201, 1)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"class_index": 3}, "InvalidClass"),
        ({"class_index": -1}, "InvalidClass"),
        ({"class_name": "melanoma"}, "InvalidClass"),
        ({"class_index": 0, "class_name": "malignant"}, "InvalidClass"),
        ({}, "ClassRequired"),
        ({"class_index": 0, "mask_rle": {"size": [H, W], "counts": [H * W]}}, "MaskNotAllowed"),
    ],
)
def test_invalid_class_labels(
    client: TestClient,
    db: Session,
    classification: tuple[Project, Image],
    annotator_headers: Headers,
    fields: dict[str, Any],
    code: str,
) -> None:
    _, image = classification
    response = _post(client, annotator_headers, image_id=image.id, idempotency_key="x", **fields)
    assert _error(response) == (422, code)
    assert db.scalar(select(func.count(Label.id))) == 0


def test_malformed_bodies_use_the_error_envelope(
    client: TestClient, classification: tuple[Project, Image], annotator_headers: Headers
) -> None:
    _, image = classification
    missing_key = _post(client, annotator_headers, image_id=image.id, class_index=0)
    assert _error(missing_key) == (422, "ValidationError")
    extra = _post(client, annotator_headers, image_id=image.id, idempotency_key="k", colour=1)
    assert _error(extra) == (422, "ValidationError")
    unknown = _post(client, annotator_headers, image_id=999_999, idempotency_key="k", class_index=0)
    assert _error(unknown) == (404, "ImageNotFound")
    text = client.post(
        "/labels", content=b"x", headers={**annotator_headers, "content-type": "text/plain"}
    )
    assert _error(text) == (415, "UnsupportedMediaType")
    assert client.post("/labels", json={}).status_code == 401


def test_idempotent_retry_returns_the_first_label(
    client: TestClient,
    db: Session,
    classification: tuple[Project, Image],
    annotator_headers: Headers,
    make_user: Callable[..., tuple[User, str]],
) -> None:
    _, image = classification
    first = _post(client, annotator_headers, image_id=image.id, idempotency_key="r", class_index=0)
    retry = _post(client, annotator_headers, image_id=image.id, idempotency_key="r", class_index=0)
    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json() == first.json()
    assert db.scalar(select(func.count(Label.id))) == 1
    assert db.scalar(select(func.count(Event.id)).where(Event.kind == "label.created")) == 1

    # Keys are per author (issue 14, M2): another user's "r" is a label of their own.
    other, token = make_user("someone-else", Role.annotator)
    theirs = _post(client, _headers(token), image_id=image.id, idempotency_key="r", class_index=0)
    assert theirs.status_code == 201
    assert (theirs.json()["author_id"], theirs.json()["id"]) != (
        first.json()["author_id"],
        first.json()["id"],
    )
    assert theirs.json()["author_id"] == other.id


def test_history_is_append_only_newest_first(
    client: TestClient,
    classification: tuple[Project, Image],
    annotator_headers: Headers,
    admin_headers: Headers,
) -> None:
    _, image = classification
    authored = [
        (annotator_headers, "h1", 0),
        (admin_headers, "h2", 1),
        (annotator_headers, "h3", 2),
    ]
    ids = [
        _post(client, headers, image_id=image.id, idempotency_key=key, class_index=index).json()
        for headers, key, index in authored
    ]
    ids = [label["id"] for label in ids]
    history = client.get(f"/images/{image.id}/labels", headers=annotator_headers)
    assert history.status_code == 200
    rows = history.json()
    assert [row["id"] for row in rows] == ids[::-1]
    assert [row["author_name"] for row in rows] == ["annotator", "admin", "annotator"]
    assert [row["class_name"] for row in rows] == ["other", "malignant", "benign"]
    assert all(row["created_at"] for row in rows)
    one = client.get(f"/labels/{ids[0]}", headers=annotator_headers)
    assert one.json() == rows[-1]
    missing = client.get("/images/999999/labels", headers=annotator_headers)
    assert _error(missing) == (404, "ImageNotFound")
    assert _error(client.get("/labels/999999", headers=annotator_headers)) == (404, "LabelNotFound")
    no_mask = client.get(f"/labels/{ids[0]}/mask", headers=annotator_headers)
    assert _error(no_mask) == (404, "MaskNotFound")


def _mask_from(client: TestClient, headers: Headers, label: dict[str, Any]) -> np.ndarray:
    response = client.get(label["mask_url"], headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    stored = PILImage.open(io.BytesIO(response.content))
    assert stored.mode == "L"
    values = np.asarray(stored)
    assert set(np.unique(values).tolist()) <= {0, 255}
    return np.asarray(values == 255)


@pytest.mark.parametrize("scale", [255, 1])
def test_mask_png_upload_round_trip(
    client: TestClient,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    storage: Storage,
    scale: int,
) -> None:
    project, image = segmentation
    mask = _disc()
    response = client.post(
        "/labels",
        data={"image_id": str(image.id), "idempotency_key": f"png-{scale}"},
        files={"mask": ("mask.png", _png((mask * scale).astype(np.uint8)), "image/png")},
        headers=annotator_headers,
    )
    assert response.status_code == 201, response.text
    label = response.json()
    assert label["mask_url"] == f"/labels/{label['id']}/mask"
    assert label["class_index"] is None
    np.testing.assert_array_equal(_mask_from(client, annotator_headers, label), mask)
    assert list((storage.root / "masks" / str(project.id)).glob("*.png"))


@pytest.mark.parametrize("compressed", [True, False])
def test_mask_rle_round_trip_is_bit_exact(
    client: TestClient,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    compressed: bool,
) -> None:
    _, image = segmentation
    mask = np.random.default_rng(7).random((H, W)) > 0.6
    rle: dict[str, Any] = mask_to_rle(mask)
    if not compressed:
        flat = mask.flatten(order="F").astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        runs = np.diff(np.concatenate([[0], edges])).tolist()
        rle = {"size": [H, W], "counts": runs}
        assert sum(runs) == H * W
    response = _post(
        client, annotator_headers, image_id=image.id, idempotency_key="rle", mask_rle=rle
    )
    assert response.status_code == 201, response.text
    np.testing.assert_array_equal(_mask_from(client, annotator_headers, response.json()), mask)


def test_grayscale_rgba_png_is_accepted(
    client: TestClient, segmentation: tuple[Project, Image], annotator_headers: Headers
) -> None:
    _, image = segmentation
    mask = _disc()
    rgba = np.stack([mask * 255] * 3 + [np.full(mask.shape, 255)], axis=-1).astype(np.uint8)
    response = client.post(
        "/labels",
        data={"image_id": str(image.id), "idempotency_key": "rgba"},
        files={"mask": ("m.png", _png(rgba, "RGBA"), "image/png")},
        headers=annotator_headers,
    )
    assert response.status_code == 201, response.text
    np.testing.assert_array_equal(_mask_from(client, annotator_headers, response.json()), mask)


def _rle(counts: Any, size: tuple[int, int] = (H, W)) -> dict[str, Any]:
    return {"mask_rle": {"size": list(size), "counts": counts}}


def _bad_masks() -> list[Any]:
    grey = (_disc() * 128).astype(np.uint8)
    three = np.where(_disc(), 255, 1).astype(np.uint8)
    colour = np.zeros((H, W, 3), np.uint8)
    colour[..., 0] = _disc() * 255
    cases = [
        ("png-size", {"png": _png(np.zeros((H + 1, W), np.uint8))}, "MaskSizeMismatch"),
        ("rle-size", _rle([H * W], (W, H)), "MaskSizeMismatch"),
        ("grey", {"png": _png(grey)}, "MaskNotBinary"),
        ("0-1-255", {"png": _png(three)}, "MaskNotBinary"),
        ("colour", {"png": _png(colour)}, "MaskNotBinary"),
        ("not-png", {"png": b"not a png"}, "InvalidMask"),
        ("rle-long", _rle([H * W + 5]), "InvalidRle"),
        ("rle-negative", _rle([5, -5, H * W]), "InvalidRle"),
        ("rle-chars", _rle("~~~"), "InvalidRle"),
        ("rle-short", _rle("0"), "InvalidRle"),
        ("no-mask", {}, "MaskRequired"),
        ("class", {"class_index": 0}, "ClassNotAllowed"),
    ]
    return [pytest.param(fields, code, id=name) for name, fields, code in cases]


@pytest.mark.parametrize(("fields", "code"), _bad_masks())
def test_invalid_masks(
    client: TestClient,
    db: Session,
    segmentation: tuple[Project, Image],
    annotator_headers: Headers,
    storage: Storage,
    fields: dict[str, Any],
    code: str,
) -> None:
    _, image = segmentation
    fields = dict(fields)  # the parameter is shared by both database runs
    png = fields.pop("png", None)
    if png is None:
        response = _post(
            client, annotator_headers, image_id=image.id, idempotency_key="m", **fields
        )
    else:
        response = client.post(
            "/labels",
            data={"image_id": str(image.id), "idempotency_key": "m"},
            files={"mask": ("m.png", png, "image/png")},
            headers=annotator_headers,
        )
    assert _error(response) == (422, code)
    assert db.scalar(select(func.count(Label.id))) == 0
    assert not list(storage.root.glob("masks/**/*.png"))


def test_mask_file_is_deleted_when_the_transaction_rolls_back(
    db: Session,
    settings: Settings,
    storage: Storage,
    segmentation: tuple[Project, Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    _, image = segmentation
    user, _ = make_user("rollback", Role.annotator)
    data = LabelCreate(image_id=image.id, idempotency_key="rb", mask_rle=mask_to_rle(_disc()))
    label, created = create_label(db, settings, storage, user, data)
    key = label.mask_key
    assert created and key is not None
    assert storage.exists(key)
    db.rollback()
    assert not storage.exists(key)

    kept, _ = create_label(
        db, settings, storage, user, data.model_copy(update={"idempotency_key": "ok"})
    )
    db.commit()
    assert kept.mask_key is not None and storage.exists(kept.mask_key)


# ---- leases and the queue -------------------------------------------------------------


@pytest.fixture
def leased(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> Callable[..., tuple[Project, list[QueueItem], list[dict[str, Any]]]]:
    """``leased(n, **fields)``: a project with n queue items, all leased by the annotator."""

    def factory(n: int = 2, **fields: Any) -> tuple[Project, list[QueueItem], list[dict[str, Any]]]:
        project = make_project(**fields)
        images = [make_image(project) for _ in range(n)]
        items = add_items(db, project, add_round(db, project), images)
        return project, items, get_queue(client, annotator_headers, project)

    return factory


def _needed(db: Session, item: QueueItem) -> int:
    return int(db.scalar(select(QueueItem.labels_needed).where(QueueItem.id == item.id)) or 0)


def test_label_with_lease_closes_it_and_counts_once(
    client: TestClient,
    db: Session,
    leased: Callable[..., tuple[Project, list[QueueItem], list[dict[str, Any]]]],
    annotator_headers: Headers,
) -> None:
    project, items, entries = leased(1, overlap=2)
    entry = entries[0]

    def rows() -> tuple[Any, ...]:  # the columns that labeling must leave alone
        lease = db.execute(
            select(Lease.queue_item_id, Lease.project_id, Lease.image_id, Lease.user_id,
                   Lease.expires_at, Lease.created_at).where(Lease.id == entry["lease_id"])
        ).one()  # fmt: skip
        item = db.execute(
            select(QueueItem.project_id, QueueItem.image_id, QueueItem.round_id, QueueItem.rank,
                   QueueItem.created_at).where(QueueItem.id == items[0].id)
        ).one()  # fmt: skip
        return tuple(lease), tuple(item)

    before = rows()
    body = {"image_id": entry["image_id"], "lease_id": entry["lease_id"], "class_index": 0}
    first = _post(client, annotator_headers, idempotency_key="l1", **body)
    assert first.status_code == 201
    assert db.scalar(select(Lease.state).where(Lease.id == entry["lease_id"])) == "done"
    assert _needed(db, items[0]) == 1
    correction = _post(
        client, annotator_headers, idempotency_key="l2", **{**body, "class_index": 1}
    )
    assert correction.status_code == 201
    assert _needed(db, items[0]) == 1  # the same author counts once
    assert rows() == before
    events = db.scalars(select(Event).where(Event.kind == "label.created").order_by(Event.id))
    assert [(e.project_id, e.actor_id, e.payload) for e in events] == [
        (project.id, first.json()["author_id"], {"label_id": label["id"],
         "image_id": entry["image_id"], "lease_id": entry["lease_id"]})
        for label in (first.json(), correction.json())
    ]  # fmt: skip


def test_lease_errors_on_labels(
    client: TestClient,
    db: Session,
    leased: Callable[..., tuple[Project, list[QueueItem], list[dict[str, Any]]]],
    annotator_headers: Headers,
    make_user: Callable[..., tuple[User, str]],
) -> None:
    _, items, entries = leased(2)
    first, second = entries
    _, token = make_user("intruder", Role.annotator)
    needed = [_needed(db, item) for item in items]

    def post(headers: Headers, image_id: int, lease_id: int, key: str) -> tuple[int, str]:
        body = {"image_id": image_id, "lease_id": lease_id, "idempotency_key": key}
        return _error(_post(client, headers, class_index=0, **body))

    assert post(_headers(token), first["image_id"], first["lease_id"], "e1") == (
        403,
        "LeaseNotYours",
    )
    assert post(annotator_headers, second["image_id"], first["lease_id"], "e2") == (
        403,
        "LeaseMismatch",
    )
    assert post(annotator_headers, first["image_id"], 999_999, "e3") == (404, "LeaseNotFound")
    db.execute(
        update(Lease)
        .where(Lease.id == first["lease_id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    assert post(annotator_headers, first["image_id"], first["lease_id"], "e4") == (
        409,
        "LeaseExpired",
    )
    client.post(f"/leases/{second['lease_id']}/release", headers=annotator_headers)
    assert post(annotator_headers, second["image_id"], second["lease_id"], "e5") == (
        409,
        "LeaseNotActive",
    )
    # Nothing of a refused label stays (on PostgreSQL the statement that checks the lease has
    # written the label, closed the lease and counted it: all rolled back).
    assert db.scalar(select(func.count(Label.id))) == 0
    assert db.scalar(select(func.count(Event.id)).where(Event.kind == "label.created")) == 0
    assert [_needed(db, item) for item in items] == needed
    states = select(Lease.state).where(Lease.id.in_([first["lease_id"], second["lease_id"]]))
    assert sorted(db.scalars(states)) == ["active", "released"]


def test_a_mask_refused_for_its_lease_leaves_no_file(
    client: TestClient,
    db: Session,
    storage: Storage,
    leased: Callable[..., tuple[Project, list[QueueItem], list[dict[str, Any]]]],
    annotator_headers: Headers,
) -> None:
    """The mask is stored before the lease is checked (on PostgreSQL by the statement that
    writes the label); a refused label deletes it again."""
    project, _, entries = leased(1, task="segmentation", classes=["lesion"])
    entry = entries[0]
    db.execute(
        update(Lease)
        .where(Lease.id == entry["lease_id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    db.commit()
    response = _post(
        client,
        annotator_headers,
        image_id=entry["image_id"],
        lease_id=entry["lease_id"],
        idempotency_key="late",
        mask_rle=mask_to_rle(_disc()),
    )
    assert _error(response) == (409, "LeaseExpired")
    assert not list((storage.root / "masks").rglob("*.png"))
    assert db.scalar(select(func.count(Label.id))) == 0


def test_require_lease(
    client: TestClient,
    leased: Callable[..., tuple[Project, list[QueueItem], list[dict[str, Any]]]],
    annotator_headers: Headers,
) -> None:
    _, _, entries = leased(1, require_lease=True)
    image_id = entries[0]["image_id"]
    without = _post(
        client, annotator_headers, image_id=image_id, idempotency_key="n", class_index=0
    )
    assert _error(without) == (403, "LeaseRequired")
    with_lease = _post(
        client,
        annotator_headers,
        image_id=image_id,
        lease_id=entries[0]["lease_id"],
        idempotency_key="y",
        class_index=0,
    )
    assert with_lease.status_code == 201


def test_label_without_lease_counts_once_per_distinct_author(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=3)
    image = make_image(project)
    (item,) = add_items(db, project, add_round(db, project), [image])
    first, second = (_headers(make_user(f"u{i}", Role.annotator)[1]) for i in range(2))
    leased = get_queue(client, first, project)
    assert len(leased) == 1

    for headers, key in [(first, "a"), (first, "b"), (second, "c")]:
        response = _post(client, headers, image_id=image.id, idempotency_key=key, class_index=1)
        assert response.status_code == 201
    assert _needed(db, item) == 1
    assert db.scalar(select(Lease.state).where(Lease.id == leased[0]["lease_id"])) == "done"
