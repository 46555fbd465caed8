"""Image upload and reading: content-addressed storage, all-or-nothing validation, limits."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.images.service import UploadConflict, prepare_image, store_images
from app.models import Image, Label, Project
from app.settings import Settings
from app.storage import Storage
from tests.conftest import png_bytes

Files = list[tuple[str, tuple[str, bytes, str]]]


def jpeg_bytes(width: int = 20, height: int = 10) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (width, height), (10, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _files(*named: tuple[str, bytes]) -> Files:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def _upload(
    client: TestClient, project: Project, headers: dict[str, str], files: Files, **form: str
) -> Any:
    return client.post(f"/projects/{project.id}/images", files=files, data=form, headers=headers)


def _stored_files(settings: Settings) -> list[Path]:
    root = settings.files_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _image_count(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(Image)) or 0


@pytest.fixture
def project(make_project: Callable[..., Project]) -> Project:
    return make_project()


def test_upload_stores_by_content_hash(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    storage: Storage,
    db: Session,
) -> None:
    png, jpg = png_bytes(32, 24), jpeg_bytes(20, 10)
    response = _upload(client, project, admin_headers, _files(("a.png", png), ("b.jpeg", jpg)))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["created"], body["duplicates"], body["labeled"]) == (2, 0, 0)
    first, second = body["items"]
    assert (first["filename"], first["status"]) == ("a.png", "created")
    image = first["image"]
    assert image["sha256"] == hashlib.sha256(png).hexdigest()
    assert (image["width"], image["height"], image["content_type"]) == (32, 24, "image/png")
    assert (image["split"], image["meta"], image["project_id"]) == ("pool", {}, project.id)
    assert second["image"]["content_type"] == "image/jpeg"
    row = db.get(Image, second["image"]["id"])
    assert row is not None
    assert row.storage_key == f"images/{project.id}/{hashlib.sha256(jpg).hexdigest()}.jpg"
    assert storage.read_bytes(row.storage_key) == jpg


def test_read_image_and_file(
    client: TestClient,
    admin_headers: dict[str, str],
    annotator_headers: dict[str, str],
    project: Project,
) -> None:
    png = png_bytes()
    image = _upload(client, project, admin_headers, _files(("x.png", png))).json()["items"][0][
        "image"
    ]
    detail = client.get(f"/images/{image['id']}", headers=annotator_headers)
    assert detail.status_code == 200
    assert detail.json()["label"] is None
    assert detail.json()["sha256"] == image["sha256"]
    response = client.get(f"/images/{image['id']}/file", headers=annotator_headers)
    assert response.status_code == 200
    assert response.content == png
    assert response.headers["content-type"] == "image/png"
    assert client.get(f"/images/{image['id']}/file").status_code == 401


def test_duplicates_are_reported_not_stored_twice(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    db: Session,
    settings: Settings,
) -> None:
    png = png_bytes()
    first = _upload(client, project, admin_headers, _files(("a.png", png), ("copy.png", png)))
    assert first.status_code == 201
    items = first.json()["items"]
    assert [i["status"] for i in items] == ["created", "duplicate"]
    assert items[0]["image"]["id"] == items[1]["image"]["id"]
    again = _upload(client, project, admin_headers, _files(("renamed.png", png)))
    assert again.status_code == 200
    assert again.json()["items"][0]["status"] == "duplicate"
    assert again.json()["items"][0]["image"]["id"] == items[0]["image"]["id"]
    assert again.json()["items"][0]["image"]["filename"] == "a.png"
    assert _image_count(db) == 1
    assert len(_stored_files(settings)) == 1


def test_same_file_in_another_project_is_new(
    client: TestClient, admin_headers: dict[str, str], make_project: Callable[..., Project]
) -> None:
    png = png_bytes()
    first, second = make_project(), make_project()
    a = _upload(client, first, admin_headers, _files(("a.png", png))).json()
    b = _upload(client, second, admin_headers, _files(("a.png", png))).json()
    assert a["created"] == b["created"] == 1
    assert a["items"][0]["image"]["id"] != b["items"][0]["image"]["id"]


@pytest.mark.parametrize(
    "bad",
    [
        b"this is not an image",
        b"",
        png_bytes()[:40],  # truncated PNG
        b"GIF89a" + b"\x00" * 20,
    ],
    ids=["text", "empty", "truncated", "broken-gif"],
)
def test_not_an_image_stores_nothing(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    db: Session,
    settings: Settings,
    bad: bytes,
) -> None:
    files = _files(("good.png", png_bytes()), ("notes.txt", bad), ("good2.png", png_bytes(8, 8)))
    response = _upload(client, project, admin_headers, files)
    assert response.status_code == 422
    assert response.json()["error"] == "InvalidImage"
    assert "notes.txt" in response.json()["detail"]
    assert _image_count(db) == 0
    assert _stored_files(settings) == []


def test_unaccepted_format_is_422(
    client: TestClient, admin_headers: dict[str, str], project: Project
) -> None:
    buf = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buf, format="PPM")
    response = _upload(client, project, admin_headers, _files(("x.ppm", buf.getvalue())))
    assert response.status_code == 422
    assert response.json()["error"] == "InvalidImage"


def test_too_many_pixels_is_refused_before_decoding(
    client: TestClient, admin_headers: dict[str, str], project: Project, settings: Settings
) -> None:
    settings.max_image_pixels = 100
    response = _upload(client, project, admin_headers, _files(("big.png", png_bytes(32, 24))))
    assert response.status_code == 422
    assert response.json()["error"] == "InvalidImage"
    assert "pixels" in response.json()["detail"]


def test_too_large_is_413_and_stores_nothing(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    db: Session,
    settings: Settings,
) -> None:
    huge = png_bytes() + b"\x00" * settings.max_upload_bytes
    response = _upload(
        client, project, admin_headers, _files(("ok.png", png_bytes()), ("huge.png", huge))
    )
    assert response.status_code == 413
    assert response.json()["error"] == "UploadTooLarge"
    assert "huge.png" in response.json()["detail"]
    assert _image_count(db) == 0
    assert _stored_files(settings) == []


@pytest.mark.parametrize(
    "name",
    ["../../evil.png", "..\\..\\evil.png", "/tmp/evil.png", "sub/../../evil.png", "..", "./"],
)
def test_path_traversal_names_never_reach_the_filesystem(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    settings: Settings,
    tmp_path: Path,
    storage: Storage,
    db: Session,
    name: str,
) -> None:
    response = _upload(client, project, admin_headers, _files((name, png_bytes())))
    assert response.status_code == 201, response.text
    image = response.json()["items"][0]["image"]
    assert "/" not in image["filename"] and "\\" not in image["filename"]
    assert image["filename"] in ("evil.png", "upload")
    assert not list(tmp_path.parent.rglob("evil.png"))
    row = db.get(Image, image["id"])
    assert row is not None
    assert storage.path(row.storage_key).parent == settings.files_dir / "images" / str(project.id)


def test_label_field_imports_labels_once(
    client: TestClient, admin_headers: dict[str, str], project: Project, db: Session
) -> None:
    files = _files(("a.png", png_bytes(color=(1, 2, 3))), ("b.png", png_bytes(color=(4, 5, 6))))
    response = _upload(client, project, admin_headers, files, split="test", label="malignant")
    assert response.status_code == 201
    assert response.json()["labeled"] == 2
    image = response.json()["items"][0]["image"]
    assert image["split"] == "test"
    detail = client.get(f"/images/{image['id']}", headers=admin_headers).json()
    label = detail["label"]
    assert (label["class_index"], label["class_name"], label["source"]) == (
        1,
        "malignant",
        "import",
    )
    assert (label["author_name"], label["has_mask"]) == ("admin", False)
    row = db.scalar(select(Label).where(Label.image_id == image["id"]))
    assert row is not None
    assert row.idempotency_key == f"import:{project.id}:{image['sha256']}:malignant"
    again = _upload(client, project, admin_headers, files, split="test", label="malignant")
    assert again.status_code == 200
    assert again.json()["labeled"] == 0
    assert db.scalar(select(func.count()).select_from(Label)) == 2


def test_unknown_label_stores_nothing(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    db: Session,
    settings: Settings,
) -> None:
    response = _upload(client, project, admin_headers, _files(("a.png", png_bytes())), label="cat")
    assert response.status_code == 422
    assert response.json()["error"] == "UnknownClass"
    assert _image_count(db) == 0
    assert _stored_files(settings) == []


def test_class_label_on_a_segmentation_project_is_422(
    client: TestClient, admin_headers: dict[str, str], make_project: Callable[..., Project]
) -> None:
    project = make_project(task="segmentation", classes=["lesion"], alpha=0.5)
    response = _upload(
        client, project, admin_headers, _files(("a.png", png_bytes())), label="lesion"
    )
    assert response.status_code == 422
    assert response.json()["error"] == "UnknownClass"


def test_meta_and_val_split(
    client: TestClient, admin_headers: dict[str, str], project: Project
) -> None:
    meta = {"age": 45, "site": "back"}
    response = _upload(
        client,
        project,
        admin_headers,
        _files(("a.png", png_bytes())),
        split="val",
        meta=json.dumps(meta),
    )
    image = response.json()["items"][0]["image"]
    assert (image["split"], image["meta"]) == ("val", meta)


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"meta": "{not json"}, "InvalidMeta"),
        ({"meta": "[1, 2]"}, "InvalidMeta"),
        ({"split": "train"}, "ValidationError"),
    ],
)
def test_bad_form_fields_are_422(
    client: TestClient,
    admin_headers: dict[str, str],
    project: Project,
    form: dict[str, str],
    error: str,
) -> None:
    response = _upload(client, project, admin_headers, _files(("a.png", png_bytes())), **form)
    assert response.status_code == 422
    assert response.json()["error"] == error


def test_no_files_is_422(
    client: TestClient, admin_headers: dict[str, str], project: Project
) -> None:
    response = client.post(
        f"/projects/{project.id}/images", data={"split": "pool"}, headers=admin_headers
    )
    assert response.status_code == 422
    assert response.json()["error"] == "ValidationError"


def test_upload_roles_and_missing_project(
    client: TestClient,
    admin_headers: dict[str, str],
    annotator_headers: dict[str, str],
    project: Project,
) -> None:
    files = _files(("a.png", png_bytes()))
    forbidden = _upload(client, project, annotator_headers, files)
    assert forbidden.status_code == 403
    assert forbidden.json()["error"] == "Forbidden"
    assert _upload(client, project, {}, files).status_code == 401
    missing = client.post("/projects/999999/images", files=files, headers=admin_headers)
    assert missing.status_code == 404
    assert missing.json()["error"] == "ProjectNotFound"


def test_list_images_pages_and_filters(
    client: TestClient,
    annotator_headers: dict[str, str],
    project: Project,
    make_image: Callable[..., Image],
) -> None:
    pool = [make_image(project) for _ in range(5)]
    make_image(project, split="test")
    url = f"/projects/{project.id}/images"
    everything = client.get(url, headers=annotator_headers).json()
    assert everything["total"] == 6
    page = client.get(
        url, params={"split": "pool", "limit": 2, "offset": 2}, headers=annotator_headers
    )
    assert page.status_code == 200
    body = page.json()
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 2)
    assert [i["id"] for i in body["items"]] == [pool[2].id, pool[3].id]
    assert client.get(url, params={"limit": 0}, headers=annotator_headers).status_code == 422
    assert client.get(url, params={"split": "x"}, headers=annotator_headers).status_code == 422
    assert client.get("/projects/999999/images", headers=annotator_headers).status_code == 404


def test_unknown_image_and_missing_file_are_404(
    client: TestClient,
    annotator_headers: dict[str, str],
    project: Project,
    make_image: Callable[..., Image],
    storage: Storage,
) -> None:
    response = client.get("/images/999999", headers=annotator_headers)
    assert response.status_code == 404
    assert response.json()["error"] == "ImageNotFound"
    assert client.get("/images/999999/file", headers=annotator_headers).status_code == 404
    image = make_image(project)
    storage.delete(image.storage_key)
    gone = client.get(f"/images/{image.id}/file", headers=annotator_headers)
    assert gone.status_code == 404
    assert gone.json()["error"] == "FileMissing"


def test_files_are_removed_when_the_insert_fails(
    db: Session, storage: Storage, settings: Settings
) -> None:
    """A database error after the files were written leaves no file behind."""
    ghost = Project(id=987654, name="ghost", task="classification", classes=["a", "b"])
    prepared = prepare_image("a.png", png_bytes(), max_pixels=settings.max_image_pixels)
    with pytest.raises(UploadConflict):
        store_images(db, storage, ghost, [prepared], split="pool", author=None)
    assert _stored_files(settings) == []
    assert _image_count(db) == 0
