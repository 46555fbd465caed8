"""GET /export: the content of each format, history, errors, and page-by-page streaming."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from pycocotools import mask as mask_util
from sqlalchemy.orm import Session, sessionmaker

from app.exports import rows
from app.exports import service as formats
from app.exports.schemas import CSV_COLUMNS, MANIFEST_COLUMNS
from app.models import Image, ModelVersion, Prediction, Project, Round
from app.storage import Storage
from tests.api.test_formats_roundtrip import H, Headers, W, export, post_label

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def add_model_version(db: Session, project: Project, number: int) -> ModelVersion:
    rnd = Round(
        project_id=project.id,
        number=number,
        status="done",
        strategy=project.strategy,
        alpha=project.alpha,
        budget=1,
        progress={},
        metrics={},
    )
    db.add(rnd)
    db.flush()
    version = ModelVersion(project_id=project.id, round_id=rnd.id, checkpoint_key="x", sha256="0")
    db.add(version)
    db.commit()
    return version


@pytest.fixture
def classified(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> tuple[Project, list[Image], list[int]]:
    """Three images: two labels, one label, none; predictions of two model versions."""
    project = make_project()
    images = [make_image(project) for _ in range(3)]
    ids = [post_label(client, annotator_headers, images[0].id, "a", 0)]
    ids.append(post_label(client, annotator_headers, images[0].id, "b", 1))
    ids.append(post_label(client, annotator_headers, images[1].id, "c", 0))
    for number, probs in enumerate(([0.9, 0.1], [0.3, 0.7])):
        version = add_model_version(db, project, number)
        db.add(Prediction(model_version_id=version.id, image_id=images[2].id, class_probs=probs))
    db.commit()
    return project, images, ids


def test_label_studio_tasks_with_predictions(
    client: TestClient,
    classified: tuple[Project, list[Image], list[int]],
    admin_headers: Headers,
) -> None:
    project, images, ids = classified
    tasks = json.loads(export(client, admin_headers, project.id, "ls", False))
    history = json.loads(export(client, admin_headers, project.id, "ls", True))

    assert [t["id"] for t in tasks] == [image.id for image in images]
    first = tasks[0]
    assert first["data"]["coreloop_image_id"] == images[0].id
    assert first["data"]["sha256"] == images[0].sha256
    assert first["data"]["image"].endswith(f"/images/{images[0].id}/file")
    assert [a["id"] for a in first["annotations"]] == [ids[1]]
    assert first["annotations"][0]["result"][0]["type"] == "choices"
    assert first["annotations"][0]["result"][0]["value"] == {"choices": ["malignant"]}
    assert [a["id"] for a in history[0]["annotations"]] == ids[:2]
    assert tasks[2]["annotations"] == []
    [prediction] = tasks[2]["predictions"]
    assert prediction["score"] == pytest.approx(0.7)
    assert prediction["result"][0]["value"] == {"choices": ["malignant"]}
    assert len(history[2]["predictions"]) == 2


def test_csv_rows(
    client: TestClient,
    classified: tuple[Project, list[Image], list[int]],
    admin_headers: Headers,
) -> None:
    project, images, ids = classified
    response = client.get(
        "/export", params={"project_id": project.id, "format": "csv"}, headers=admin_headers
    )
    table = list(csv.DictReader(io.StringIO(response.text)))

    assert response.headers["content-type"].startswith("text/csv")
    assert f"coreloop-project{project.id}-csv.csv" in response.headers["content-disposition"]
    assert tuple(table[0]) == CSV_COLUMNS
    assert [(r["image_id"], r["class_index"], r["class_name"]) for r in table] == [
        (str(images[0].id), "1", "malignant"),
        (str(images[1].id), "0", "benign"),
    ]
    assert {r["author"] for r in table} == {"annotator"}
    assert {r["source"] for r in table} == {"human"}


@pytest.fixture
def segmented(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: Headers,
) -> tuple[Project, list[Image], list[np.ndarray]]:
    project = make_project(task="segmentation", classes=["lesion"])
    images = [make_image(project) for _ in range(2)]
    box = np.zeros((H, W), dtype=bool)
    box[3:9, 5:17] = True
    masks = [box, np.zeros((H, W), dtype=bool), np.random.default_rng(1).random((H, W)) > 0.5]
    post_label(client, annotator_headers, images[0].id, "m0", masks[0])
    post_label(client, annotator_headers, images[1].id, "m1", masks[1])
    post_label(client, annotator_headers, images[1].id, "m2", masks[2])
    return project, images, masks


def test_coco_masks_with_area_and_bbox(
    client: TestClient,
    segmented: tuple[Project, list[Image], list[np.ndarray]],
    admin_headers: Headers,
) -> None:
    project, images, masks = segmented
    coco = json.loads(export(client, admin_headers, project.id, "coco", True))

    assert coco["categories"] == [{"id": 1, "name": "lesion"}]
    assert [i["id"] for i in coco["images"]] == [image.id for image in images]
    assert [a["image_id"] for a in coco["annotations"]] == [images[0].id] + [images[1].id] * 2
    for annotation, mask in zip(coco["annotations"], masks, strict=True):
        rle = {
            **annotation["segmentation"],
            "counts": annotation["segmentation"]["counts"].encode(),
        }
        np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), mask)
        assert annotation["area"] == int(mask.sum())
        assert annotation["bbox"] == [float(v) for v in mask_util.toBbox(rle)]
        assert (annotation["iscrowd"], annotation["category_id"]) == (0, 1)
    assert coco["annotations"][0]["bbox"] == [5.0, 3.0, 12.0, 6.0]


def _zip_masks(data: bytes) -> tuple[list[dict[str, str]], dict[str, np.ndarray]]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    manifest = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    pngs = {
        name: np.asarray(PILImage.open(io.BytesIO(archive.read(name))))
        for name in archive.namelist()
        if name.endswith(".png")
    }
    return manifest, pngs


def test_mask_zip_current_and_history(
    client: TestClient,
    segmented: tuple[Project, list[Image], list[np.ndarray]],
    admin_headers: Headers,
) -> None:
    project, images, masks = segmented
    manifest, pngs = _zip_masks(export(client, admin_headers, project.id, "masks", False))
    history, history_pngs = _zip_masks(export(client, admin_headers, project.id, "masks", True))

    stems = [image.filename.rsplit(".", 1)[0] for image in images]
    assert tuple(manifest[0]) == MANIFEST_COLUMNS
    assert [r["mask"] for r in manifest] == [
        f"masks/{images[0].id}_{stems[0]}.png",
        f"masks/{images[1].id}_{stems[1]}.png",
    ]
    for row, mask in zip(manifest, [masks[0], masks[2]], strict=True):
        assert set(np.unique(pngs[row["mask"]]).tolist()) <= {0, 255}
        np.testing.assert_array_equal(pngs[row["mask"]] == 255, mask)
    assert [r["mask"] for r in history] == [
        f"masks/{images[int(i > 0)].id}_{stems[int(i > 0)]}_label{r['label_id']}.png"
        for i, r in enumerate(history)
    ]
    assert len(history_pngs) == 3


@pytest.mark.parametrize(("task", "fmt"), [("segmentation", "csv"), ("classification", "masks")])
def test_a_format_for_the_other_task_is_refused(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    task: str,
    fmt: str,
) -> None:
    project = make_project(task=task)
    response = client.get(
        "/export", params={"project_id": project.id, "format": fmt}, headers=admin_headers
    )
    assert (response.status_code, response.json()["error"]) == (422, "FormatNotForTask")


def test_export_errors(
    client: TestClient,
    make_project: Callable[..., Project],
    admin_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project()
    as_annotator = client.get(
        "/export", params={"project_id": project.id}, headers=annotator_headers
    )
    missing = client.get("/export", params={"project_id": 999_999}, headers=admin_headers)
    bad = client.get(
        "/export", params={"project_id": project.id, "format": "xml"}, headers=admin_headers
    )
    assert (as_annotator.status_code, as_annotator.json()["error"]) == (403, "Forbidden")
    assert (missing.status_code, missing.json()["error"]) == (404, "ProjectNotFound")
    assert (bad.status_code, bad.json()["error"]) == (422, "ValidationError")


def test_export_reads_page_by_page_and_keeps_its_cut(
    monkeypatch: pytest.MonkeyPatch,
    db: Session,
    session_factory: sessionmaker[Session],
    storage: Storage,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
) -> None:
    """A fresh session per page; rows added while the export runs are not in it."""
    monkeypatch.setattr(rows, "PAGE_SIZE", 2)
    opened: list[int] = []

    def counting() -> Any:
        opened.append(1)
        return session_factory()

    project = make_project()
    images = [make_image(project) for _ in range(5)]
    snap = formats.snapshot_project(db, project.id)
    stream: Iterator[bytes] = formats.export_stream(
        "ls",
        counting,
        storage,
        snap,
        history=True,
        base_url="http://x",  # type: ignore[arg-type]
    )
    head = next(stream) + next(stream)  # "[" and the first task: one page read so far
    assert len(opened) == 1
    late = make_image(project)  # added while the export runs
    body = head + b"".join(stream)

    assert [task["id"] for task in json.loads(body)] == [image.id for image in images]
    assert late.id not in {task["id"] for task in json.loads(body)}
    assert len(opened) == 3  # pages of 2, 2 and 1 images
