"""Reading the HAM10000 layout, the lesion-grouped split, the subset and the image cache."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml import ham10000
from ml.ham10000 import lesion_split, limit_by_lesion, load_cached, load_ham10000, read_ham10000

REAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ham10000"
DX = ("bkl", "mel", "nv")
COLOURS = {"bkl": (200, 160, 90), "mel": (60, 30, 20), "nv": (150, 90, 60)}


def write_ham_layout(root: Path, n: int = 60, seed: int = 0, parts: bool = False) -> Path:
    """A tiny HAM10000-layout folder: ``n`` 40x30 JPEGs (a disc whose colour is the class, 3
    classes), ``HAM10000_metadata.csv`` with lesions of 1-3 images, and 0/255 masks in
    ``masks/``. ``parts``: images split over the download's two part folders."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    lesion = 0
    while len(rows) < n:
        dx = DX[lesion % 3]
        for _ in range(min(int(rng.integers(1, 4)), n - len(rows))):
            rows.append({"lesion_id": f"HAM_{lesion:07d}", "image_id": f"ISIC_{len(rows):07d}",
                         "dx": dx, "dx_type": "histo", "age": "50.0", "sex": "male",
                         "localization": "back"})  # fmt: skip
        lesion += 1
    (root / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:30, :40]
    for i, row in enumerate(rows):
        folder = root / (f"HAM10000_images_part_{1 + i % 2}" if parts else "images")
        folder.mkdir(exist_ok=True)
        cy, cx, r = rng.uniform(10, 20), rng.uniform(12, 28), rng.uniform(5, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        pixels = rng.normal(210, 12, (30, 40, 3))
        pixels[disc] = np.array(COLOURS[row["dx"]]) + rng.normal(0, 8, (int(disc.sum()), 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(folder / f"{row['image_id']}.jpg", quality=95)
        mask = Image.fromarray((disc * 255).astype(np.uint8))
        mask.save(root / "masks" / f"{row['image_id']}_segmentation.png")
    with (root / "HAM10000_metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ham_layout(tmp_path_factory.mktemp("ham"))


def test_read_layout(layout: Path) -> None:
    index = read_ham10000(layout)
    assert len(index) == 60
    assert index.classes == DX
    assert set(index.labels.tolist()) == {0, 1, 2}
    assert all(p.is_file() for p in index.image_paths)
    assert all(m is not None and m.name == f"{i}_segmentation.png"
               for i, m in zip(index.image_ids, index.mask_paths, strict=True))  # fmt: skip
    assert len(np.unique(index.lesion_ids)) < 60  # lesions repeat


def test_read_part_folders_and_missing_image(tmp_path: Path) -> None:
    root = write_ham_layout(tmp_path / "parts", n=10, parts=True)
    index = read_ham10000(root, masks_dir=root / "masks")
    assert {p.parent.name for p in index.image_paths} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }
    next((root / "HAM10000_images_part_1").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="1 images missing"):
        read_ham10000(root)
    with pytest.raises(FileNotFoundError, match="HAM10000_metadata.csv"):
        read_ham10000(tmp_path)


def _lesion_sets(lesion_ids: np.ndarray, pool: np.ndarray, test: np.ndarray) -> tuple[set, set]:
    return set(lesion_ids[pool].tolist()), set(lesion_ids[test].tolist())


def test_lesion_split_is_grouped_seeded_and_complete(layout: Path) -> None:
    index = read_ham10000(layout)
    pool, test = lesion_split(index.lesion_ids, 0.2, seed=3, strata=index.labels)
    assert sorted([*pool, *test]) == list(range(60))
    pool_lesions, test_lesions = _lesion_sets(index.lesion_ids, pool, test)
    assert not pool_lesions & test_lesions
    assert 8 <= len(test) <= 16
    again = lesion_split(index.lesion_ids, 0.2, seed=3, strata=index.labels)
    assert np.array_equal(again[1], test)
    others = [lesion_split(index.lesion_ids, 0.2, seed=s, strata=index.labels)[1] for s in range(4)]
    assert len({tuple(t) for t in others}) > 1


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="HAM10000 not on this machine")
def test_lesion_split_on_real_metadata() -> None:
    with (REAL_DATA / "HAM10000_metadata.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lesions = np.array([r["lesion_id"] for r in rows])
    dx = np.array([r["dx"] for r in rows])
    for seed in (0, 1):
        pool, test = lesion_split(lesions, 0.2, seed=seed, strata=dx)
        pool_lesions, test_lesions = _lesion_sets(lesions, pool, test)
        assert not pool_lesions & test_lesions
        assert abs(len(test) / len(rows) - 0.2) < 0.005
        for name in np.unique(dx):  # stratified: each class ~20% in test
            assert abs(np.mean(dx[test] == name) - np.mean(dx == name)) < 0.01


def test_limit_keeps_whole_lesions(layout: Path) -> None:
    index = read_ham10000(layout)
    small = limit_by_lesion(index, 25)
    assert 22 <= len(small) <= 25
    kept = set(small.lesion_ids.tolist())
    assert sum(lid in kept for lid in index.lesion_ids) == len(small)
    assert small.classes == index.classes
    assert small.image_ids == limit_by_lesion(index, 25).image_ids
    assert limit_by_lesion(index, 1000) is index


def test_cache_is_written_once_and_reused(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = read_ham10000(layout)
    images = load_cached(index, 32, tmp_path)
    masks = load_cached(index, 32, tmp_path, masks=True)
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8
    assert masks.shape == (60, 32, 32) and set(np.unique(masks).tolist()) <= {0, 1}
    assert len(list(tmp_path.glob("*.npy"))) == 2

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(ham10000, "load_images", fail)
    assert np.array_equal(load_cached(index, 32, tmp_path), images)
    with pytest.raises(AssertionError):  # another subset is another cache entry
        load_cached(index.subset(np.arange(10)), 32, tmp_path)


def test_load_for_segmentation_and_classification(layout: Path, tmp_path: Path) -> None:
    cls = load_ham10000(layout, "classification", 32, tmp_path, limit=30)
    assert cls.num_classes == 3 and cls.masks is None and cls.targets is not None
    assert len(cls.dataset(np.arange(5))) == 5
    seg = load_ham10000(layout, "segmentation", 32, tmp_path, masks_dir=layout / "masks")
    assert seg.num_classes == 1 and seg.targets is None and seg.masks is not None
    assert seg.masks.shape == (60, 32, 32)
    with pytest.raises(FileNotFoundError, match="no masks"):
        load_ham10000(layout, "segmentation", 32, tmp_path, masks_dir=tmp_path / "none")
