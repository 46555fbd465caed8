"""The importer on tiny data sets made in tmp_path, in the HAM10000, ISIC and folders layouts."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.images.importer import ImportFailed, ImportOptions, ImportResult, import_images
from app.models import Image, Label, Project
from app.projects.service import ProjectNotFound
from app.settings import Settings
from app.storage import Storage

HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (20, 15)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", size, (seed * 37 % 256, seed * 11 % 256, seed % 256)).save(path, "JPEG")


def _mask(path: Path, size: tuple[int, int] = (20, 15), high: int = 255) -> None:
    mask = PILImage.new("L", size, 0)
    mask.paste(high, (5, 5, 12, 10))
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path, "PNG")


def make_ham(root: Path, rows: list[tuple[str, str]]) -> Path:
    """``rows``: (image_id, dx); writes images/ and HAM10000_metadata.csv like the real set."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "HAM10000_metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HAM_COLUMNS)
        for n, (image_id, dx) in enumerate(rows):
            writer.writerow([f"HAM_{n // 2:07d}", image_id, dx, "histo", "45.0", "male", "back"])
            _jpeg(root / "images" / f"{image_id}.jpg", n)
    return root / "images"


HAM_ROWS = [(f"ISIC_{n:07d}", dx) for n, dx in enumerate(["nv", "mel", "nv", "bkl", "nv"])]


@pytest.fixture
def importer(
    session_factory: sessionmaker[Session], storage: Storage, settings: Settings
) -> Callable[..., ImportResult]:
    def run(project: Project, images: Path, **options: Any) -> ImportResult:
        opts = ImportOptions(progress=False, **options)
        return import_images(session_factory, storage, settings, project.name, images, opts)

    return run


def _counts(result: ImportResult) -> tuple[int, int, int, int]:
    return (result.created, result.duplicates, result.labeled, result.errors)


def test_ham10000_images_then_labels_resumably(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
) -> None:
    project = make_project(classes=["nv", "mel", "bkl"])
    images = make_ham(tmp_path, HAM_ROWS)
    assert _counts(importer(project, images, batch_size=2)) == (5, 0, 0, 0)
    row = db.scalar(select(Image).where(Image.filename == "ISIC_0000001.jpg"))
    assert row is not None
    assert row.meta == {
        "lesion_id": "HAM_0000000",
        "image_id": "ISIC_0000001",
        "dx_type": "histo",
        "age": "45.0",
        "sex": "male",
        "localization": "back",
    }
    assert (row.content_type, row.width, row.height) == ("image/jpeg", 20, 15)
    assert row.storage_key.endswith(".jpg")
    assert _counts(importer(project, images)) == (0, 5, 0, 0)
    assert _counts(importer(project, images, with_labels=True)) == (0, 5, 5, 0)
    assert _counts(importer(project, images, with_labels=True)) == (0, 5, 0, 0)
    labels = db.scalars(select(Label).order_by(Label.id)).all()
    assert [lab.class_index for lab in labels] == [0, 1, 0, 2, 0]
    assert {lab.source for lab in labels} == {"import"}
    assert db.scalar(select(func.count()).select_from(Image)) == 5


def test_limit_split_and_explicit_csv(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
) -> None:
    project = make_project(classes=["nv", "mel", "bkl"])
    images = make_ham(tmp_path / "ham", HAM_ROWS)
    moved = tmp_path / "elsewhere.csv"
    (tmp_path / "ham" / "HAM10000_metadata.csv").rename(moved)
    result = importer(project, images, csv_path=moved, limit=3, split="test", with_labels=True)
    assert _counts(result) == (3, 0, 3, 0)
    splits = set(db.scalars(select(Image.split)))
    assert splits == {"test"}


def test_bad_and_missing_files_are_counted_not_fatal(
    tmp_path: Path, importer: Callable[..., ImportResult], make_project: Callable[..., Project]
) -> None:
    project = make_project(classes=["nv", "mel", "bkl"])
    images = make_ham(tmp_path, HAM_ROWS)
    (images / "ISIC_0000002.jpg").write_bytes(b"not a jpeg")
    (images / "ISIC_0000004.jpg").unlink()
    result = importer(project, images, batch_size=2)
    assert _counts(result) == (3, 0, 0, 2)
    assert any("ISIC_0000002.jpg" in m for m in result.messages)


def test_unknown_classes_are_refused_up_front(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
) -> None:
    project = make_project(classes=["nv", "mel"])
    images = make_ham(tmp_path, HAM_ROWS)
    with pytest.raises(ImportFailed, match="bkl"):
        importer(project, images, with_labels=True)
    assert db.scalar(select(func.count()).select_from(Image)) == 0


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("no-folder", "not found"),
        ("no-csv", "not found"),
        ("bad-columns", "image_id"),
    ],
)
def test_bad_inputs_raise_import_failed(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    setup: str,
    message: str,
) -> None:
    project = make_project()
    images = tmp_path / "images"
    if setup != "no-folder":
        images.mkdir()
    if setup == "bad-columns":
        (tmp_path / "HAM10000_metadata.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ImportFailed, match=message):
        importer(project, images)


def test_isic_segmentation_masks_become_import_labels(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
    storage: Storage,
) -> None:
    project = make_project(task="segmentation", classes=["lesion"], alpha=0.5)
    images, masks = tmp_path / "images", tmp_path / "masks"
    for n in range(3):
        _jpeg(images / f"ISIC_{n}.jpg", n)
    _mask(masks / "ISIC_0_segmentation.png")
    _mask(masks / "ISIC_1_segmentation.png", high=1)  # a 0/1 mask is accepted too
    _mask(masks / "ISIC_2_segmentation.png", size=(10, 10))  # wrong size: an error
    result = importer(project, images, layout="isic", masks_dir=masks, with_labels=True)
    assert _counts(result) == (2, 0, 2, 1)
    for label in db.scalars(select(Label)):
        image = db.get(Image, label.image_id)
        assert image is not None
        assert label.mask_key == f"masks/{project.id}/{image.sha256}-import.png"
        assert label.class_index is None and label.source == "import"
        mask = PILImage.open(io.BytesIO(storage.read_bytes(label.mask_key)))
        assert mask.size == (20, 15)
        assert {value for _, value in mask.getcolors() or []} == {0, 255}
    again = importer(project, images, layout="isic", masks_dir=masks, with_labels=True)
    assert _counts(again) == (0, 2, 0, 1)


def test_isic_without_labels_imports_only_images(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
) -> None:
    project = make_project(task="segmentation", classes=["lesion"], alpha=0.5)
    _jpeg(tmp_path / "ISIC_0.jpg", 0)
    _mask(tmp_path / "ISIC_0_segmentation.png")
    assert _counts(importer(project, tmp_path, layout="isic")) == (1, 0, 0, 0)
    assert db.scalar(select(func.count()).select_from(Label)) == 0


def test_isic_labels_need_a_segmentation_project(
    tmp_path: Path, importer: Callable[..., ImportResult], make_project: Callable[..., Project]
) -> None:
    project = make_project()
    _jpeg(tmp_path / "ISIC_0.jpg", 0)
    with pytest.raises(ImportFailed, match="no class labels"):
        importer(project, tmp_path, layout="isic", with_labels=True)


def test_folders_layout(
    tmp_path: Path,
    importer: Callable[..., ImportResult],
    make_project: Callable[..., Project],
    db: Session,
) -> None:
    project = make_project(classes=["benign", "malignant"])
    for n in range(4):
        _jpeg(tmp_path / ("benign" if n % 2 else "malignant") / f"img{n}.jpg", n)
    (tmp_path / "README.txt").write_text("ignored")
    result = importer(project, tmp_path, layout="folders", with_labels=True, split="test")
    assert _counts(result) == (4, 0, 4, 0)
    by_file = {
        image.filename: label.class_index
        for image, label in db.execute(select(Image, Label).join(Label, Label.image_id == Image.id))
    }
    assert by_file == {"img0.jpg": 1, "img1.jpg": 0, "img2.jpg": 1, "img3.jpg": 0}


def test_unknown_project(tmp_path: Path, importer: Callable[..., ImportResult]) -> None:
    ghost = Project(name="nope")
    with pytest.raises(ProjectNotFound, match="nope"):
        importer(ghost, tmp_path)
