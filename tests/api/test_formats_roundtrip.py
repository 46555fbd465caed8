"""Export, then import into a fresh project with the same images: the same labels, classes and
masks bit for bit, for every format, current labels or the whole history, SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.labels.masks import decode_png_mask, mask_to_rle
from app.models import Image, Label, Project
from app.storage import Storage

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Headers = dict[str, str]
H, W = 24, 32  # make_image's default size
Content = tuple[str, Any]  # ("class", index) or ("mask", packed bits)


def twin_images(db: Session, images: list[Image], project: Project) -> list[Image]:
    """The same image files (content hash, name, size) registered in ``project``."""
    twins = [
        Image(
            project_id=project.id,
            sha256=image.sha256,
            storage_key=image.storage_key,
            filename=image.filename,
            content_type=image.content_type,
            width=image.width,
            height=image.height,
            split=image.split,
            meta={},
        )
        for image in images
    ]
    db.add_all(twins)
    db.commit()
    return twins


def post_label(client: TestClient, headers: Headers, image_id: int, key: str, value: Any) -> int:
    body: dict[str, Any] = {"image_id": image_id, "idempotency_key": key}
    if isinstance(value, np.ndarray):
        body["mask_rle"] = mask_to_rle(value)
    else:
        body["class_index"] = value
    response = client.post("/labels", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def labels_by_sha(
    db: Session, storage: Storage, project_id: int, *, history: bool = True
) -> dict[str, list[Content]]:
    """Each image's labels (oldest first; ``history=False``: the current one) by content hash."""
    rows = db.execute(
        select(Label, Image)
        .join(Image, Image.id == Label.image_id)
        .where(Label.project_id == project_id)
        .order_by(Label.id)
    ).all()
    found: dict[str, list[Content]] = {}
    for label, image in rows:
        if label.mask_key is not None:
            mask = decode_png_mask(storage.read_bytes(label.mask_key), (image.height, image.width))
            content: Content = ("mask", np.packbits(mask).tobytes())
        else:
            content = ("class", label.class_index)
        found.setdefault(image.sha256, []).append(content)
    return found if history else {sha: labels[-1:] for sha, labels in found.items()}


def label_values(task: str) -> list[list[Any]]:
    """Labels per image, oldest first: repeats, an unlabeled image, edge-case masks."""
    if task == "classification":
        return [[0, 1, 0], [1], [], [0, 0], [1]]
    rng = np.random.default_rng(3)
    noise = [rng.random((H, W)) > p for p in (0.3, 0.5, 0.8)]
    corner = np.zeros((H, W), dtype=bool)
    corner[H - 1, W - 1] = True
    empty, full = np.zeros((H, W), dtype=bool), np.ones((H, W), dtype=bool)
    return [[noise[0], noise[1], noise[0]], [corner], [], [empty, full], [noise[2], empty]]


@pytest.fixture
def labeled_pair(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> Callable[[str], tuple[Project, Project]]:
    """``labeled_pair(task)``: a labeled project, and a fresh one with the same images."""

    def factory(task: str) -> tuple[Project, Project]:
        classes = ["benign", "malignant"] if task == "classification" else ["lesion"]
        source = make_project(task=task, classes=classes)
        target = make_project(task=task, classes=classes)
        values = label_values(task)
        images = [make_image(source) for _ in values]
        twin_images(db, images, target)
        for image, labels in zip(images, values, strict=True):
            for n, value in enumerate(labels):
                post_label(client, annotator_headers, image.id, f"{image.id}-{n}", value)
        return source, target

    return factory


def export(client: TestClient, headers: Headers, project_id: int, fmt: str, history: bool) -> bytes:
    params: dict[str, Any] = {"project_id": project_id, "format": fmt, "history": history}
    response = client.get("/export", params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.content


def import_file(
    client: TestClient, headers: Headers, project_id: int, fmt: str, data: bytes
) -> Any:
    return client.post(
        f"/projects/{project_id}/import",
        params={"format": fmt},
        files={"file": (f"labels.{fmt}", io.BytesIO(data))},
        headers=headers,
    )


ROUND_TRIPS = [
    ("classification", "ls"),
    ("classification", "coco"),
    ("classification", "csv"),
    ("segmentation", "ls"),
    ("segmentation", "coco"),
    ("segmentation", "masks"),
]


@pytest.mark.parametrize("history", [False, True], ids=["current", "history"])
@pytest.mark.parametrize(("task", "fmt"), ROUND_TRIPS)
def test_export_then_import_gives_the_same_labels(
    client: TestClient,
    db: Session,
    storage: Storage,
    labeled_pair: Callable[[str], tuple[Project, Project]],
    admin_headers: Headers,
    task: str,
    fmt: str,
    history: bool,
) -> None:
    source, target = labeled_pair(task)
    data = export(client, admin_headers, source.id, fmt, history)

    first = import_file(client, admin_headers, target.id, fmt, data)
    again = import_file(client, admin_headers, target.id, fmt, data)

    expected = labels_by_sha(db, storage, source.id, history=history)
    assert labels_by_sha(db, storage, target.id) == expected
    stored = sum(len(labels) for labels in expected.values())
    assert first.status_code == 200, first.text
    assert first.json() | {"unmatched_examples": []} == {
        "format": fmt,
        "labels_in_file": stored,
        "created": stored,
        "unchanged": 0,
        "unmatched": 0,
        "unmatched_examples": [],
    }
    assert (again.json()["created"], again.json()["unchanged"]) == (0, stored)
    sources = db.scalars(select(Label.source).where(Label.project_id == target.id)).all()
    assert set(sources) == {"import"}


def test_history_import_keeps_the_current_label(
    client: TestClient,
    db: Session,
    storage: Storage,
    labeled_pair: Callable[[str], tuple[Project, Project]],
    admin_headers: Headers,
) -> None:
    """Importing a history export replays it in order, so the newest label stays current."""
    source, target = labeled_pair("classification")
    import_file(
        client, admin_headers, target.id, "ls", export(client, admin_headers, source.id, "ls", True)
    )
    assert labels_by_sha(db, storage, target.id, history=False) == labels_by_sha(
        db, storage, source.id, history=False
    )


def test_entries_without_an_image_are_counted_not_stored(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    project = make_project()
    first, second = make_image(project), make_image(project)
    second.filename = first.filename  # two images named alike: the name matches neither
    db.commit()
    rows = [
        "filename,class_name",
        f"{first.filename},malignant",
        "no-such-file.png,benign",
    ]
    response = import_file(client, admin_headers, project.id, "csv", "\n".join(rows).encode())

    assert response.status_code == 200, response.text
    assert response.json()["created"] == 0
    assert response.json()["unmatched"] == 2
    assert "no-such-file.png" in " ".join(response.json()["unmatched_examples"])


def test_label_studio_tasks_match_uploaded_file_names(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    """Tasks exported by Label Studio itself name images by upload path only."""
    project = make_project()
    image = make_image(project)
    task = {
        "id": 7,
        "data": {"image": f"/data/upload/3/0a1b2c3d-{image.filename}"},
        "annotations": [
            {"result": [{"type": "choices", "value": {"choices": ["malignant"]}}]},
            {"was_cancelled": True, "result": [{"type": "choices", "value": {"choices": ["x"]}}]},
        ],
    }
    response = import_file(client, admin_headers, project.id, "ls", json.dumps([task]).encode())

    assert response.status_code == 200, response.text
    assert response.json()["created"] == 1
    assert db.scalars(select(Label.class_index).where(Label.image_id == image.id)).all() == [1]


def test_an_invalid_entry_stores_nothing(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    project = make_project()
    images = [make_image(project) for _ in range(2)]
    rows = ["sha256,class_name", f"{images[0].sha256},benign", f"{images[1].sha256},nevus"]
    response = import_file(client, admin_headers, project.id, "csv", "\n".join(rows).encode())

    assert response.status_code == 422
    assert response.json()["error"] == "InvalidClass"
    assert "entry 1" in response.json()["detail"]
    assert db.scalars(select(Label.id).where(Label.project_id == project.id)).all() == []


@pytest.mark.parametrize(
    ("fmt", "data", "code"),
    [
        ("ls", b"{not json", "InvalidImportFile"),
        ("coco", b'{"images": "nope"}', "InvalidImportFile"),
        ("csv", b"name,label\nx,y\n", "InvalidImportFile"),
        ("masks", b"not a zip", "InvalidImportFile"),
    ],
)
def test_unreadable_files_are_refused(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    fmt: str,
    data: bytes,
    code: str,
) -> None:
    project = make_project(task="segmentation" if fmt == "masks" else "classification")
    response = import_file(client, admin_headers, project.id, fmt, data)
    assert (response.status_code, response.json()["error"]) == (422, code)


def test_coco_polygons_are_imported(
    client: TestClient,
    db: Session,
    storage: Storage,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    admin_headers: Headers,
) -> None:
    project = make_project(task="segmentation", classes=["lesion"])
    image = make_image(project)
    coco = {
        "images": [{"id": 1, "file_name": image.filename, "sha256": image.sha256}],
        "categories": [{"id": 1, "name": "lesion"}],
        "annotations": [
            {"image_id": 1, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]]}
        ],
    }
    response = import_file(client, admin_headers, project.id, "coco", json.dumps(coco).encode())

    assert response.status_code == 200, response.text
    mask_key = db.scalar(select(Label.mask_key).where(Label.image_id == image.id))
    assert mask_key is not None
    mask = decode_png_mask(storage.read_bytes(mask_key), (H, W))
    assert mask[5, 5] and not mask[0, 0] and not mask[20, 20]


def test_import_needs_an_admin(
    client: TestClient,
    make_project: Callable[..., Project],
    annotator_headers: Headers,
) -> None:
    project = make_project()
    response = import_file(client, annotator_headers, project.id, "csv", b"sha256,class_name\n")
    assert (response.status_code, response.json()["error"]) == (403, "Forbidden")
