"""Reading HAM10000 in its official layout, the lesion-grouped split, and an in-memory image cache.

Layout (Tschandl et al., Sci. Data 5, 180161, 2018; doi:10.7910/DVN/DBW86T):

- ``HAM10000_metadata.csv``: ``lesion_id,image_id,dx,...``; ``dx`` is the class;
- images ``<image_id>.jpg`` in ``images/``, or in the download's ``HAM10000_images_part_1/`` and
  ``HAM10000_images_part_2/``, or in the data folder itself;
- masks (ISIC style) ``<image_id>_segmentation.png`` in ``--masks DIR``, else ``masks/`` or
  ``HAM10000_segmentations_lesion_tschandl/`` under the data folder.

One lesion has up to 6 images, so every split here is by ``lesion_id``: an image in the test split
never has a sibling (same lesion) in the pool.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.data import ImageDataset, Task, load_images, load_masks

METADATA_FILE = "HAM10000_metadata.csv"
IMAGE_DIRS = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", ".")
MASK_DIRS = ("masks", "HAM10000_segmentations_lesion_tschandl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLIT_STREAM = 1  # the split's random stream, apart from the initial-set stream of a seed


@dataclass(frozen=True)
class HamIndex:
    """The images of a HAM10000-layout folder, in metadata order.

    ``labels`` int64 [N] index ``classes`` (the sorted distinct ``dx`` values of the whole metadata
    file, so a subset keeps the same class numbering); ``mask_paths[i]`` is None when image i has
    no mask file.
    """

    root: Path
    image_ids: tuple[str, ...]
    lesion_ids: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path | None, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, rows: np.ndarray) -> HamIndex:
        """The images at ``rows`` (int indices), in that order, with the same classes."""
        rows = np.asarray(rows, dtype=np.int64)
        return HamIndex(
            root=self.root,
            image_ids=tuple(self.image_ids[i] for i in rows),
            lesion_ids=self.lesion_ids[rows],
            labels=self.labels[rows],
            classes=self.classes,
            image_paths=tuple(self.image_paths[i] for i in rows),
            mask_paths=tuple(self.mask_paths[i] for i in rows),
        )

    def with_masks(self) -> HamIndex:
        """Only the images that have a mask file (segmentation needs one per image)."""
        return self.subset(np.array([i for i, m in enumerate(self.mask_paths) if m is not None]))


def _file_index(folders: Sequence[Path], suffix_of: str = "") -> dict[str, Path]:
    """``{stem without suffix_of: path}`` for the image files directly inside ``folders``."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if entry.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                stem = path.stem.removesuffix(suffix_of) if suffix_of else path.stem
                found.setdefault(stem, path)
    return found


def read_ham10000(data_dir: str | Path, masks_dir: str | Path | None = None) -> HamIndex:
    """Index a HAM10000-layout folder. Every metadata row must have its image (else
    ``FileNotFoundError`` naming the first missing ones); masks are optional per image."""
    root = Path(data_dir).resolve()
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: --data must be a HAM10000-layout folder")
    with metadata.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{metadata} has no rows")
    images = _file_index([root / d for d in IMAGE_DIRS])
    mask_folders = [Path(masks_dir)] if masks_dir is not None else [root / d for d in MASK_DIRS]
    masks = _file_index(mask_folders, suffix_of="_segmentation")
    missing = [r["image_id"] for r in rows if r["image_id"] not in images]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing under {root}, e.g. {missing[:3]}")
    classes = tuple(sorted({r["dx"] for r in rows}))
    return HamIndex(
        root=root,
        image_ids=tuple(r["image_id"] for r in rows),
        lesion_ids=np.array([r["lesion_id"] for r in rows]),
        labels=np.array([classes.index(r["dx"]) for r in rows], dtype=np.int64),
        classes=classes,
        image_paths=tuple(images[r["image_id"]] for r in rows),
        mask_paths=tuple(masks.get(r["image_id"]) for r in rows),
    )


def _groups(lesion_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct lesion ids (sorted) and, for each, the rows of its images."""
    names, inverse = np.unique(lesion_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(names)))[:-1]
    return names, np.split(order, bounds)


def limit_by_lesion(index: HamIndex, limit: int, seed: int = 0) -> HamIndex:
    """A seeded subset of whole lesions holding ``limit`` images (or as near as lesion sizes
    allow, never more), kept in metadata order. The same for every run seed (it is the data)."""
    if limit >= len(index):
        return index
    _, members = _groups(index.lesion_ids)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    total = 0
    for g in rng.permutation(len(members)):
        if total + len(members[g]) <= limit:
            chosen.append(members[g])
            total += len(members[g])
        if total == limit:
            break
    return index.subset(np.sort(np.concatenate(chosen)))


def lesion_split(
    lesion_ids: np.ndarray,
    test_fraction: float,
    seed: int,
    strata: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into ``(pool, test)`` (sorted int64 row indices) by lesion, seeded.

    Within each stratum (e.g. the class ``dx``: one lesion has one diagnosis), lesions are taken
    in a seeded random order and each goes to the test side when that brings the stratum's test
    image count closer to ``test_fraction`` of its images. So the test split has ~``test_fraction``
    of the images with the class proportions of the whole set, and no lesion is on both sides.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    names, members = _groups(np.asarray(lesion_ids))
    if strata is None:
        lesion_stratum = np.zeros(len(names), dtype=np.int64)
    else:
        lesion_stratum = np.array([np.asarray(strata)[m[0]] for m in members])
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    test_rows: list[np.ndarray] = []
    for stratum in np.unique(lesion_stratum):
        lesions = rng.permutation(np.flatnonzero(lesion_stratum == stratum))
        target = test_fraction * sum(len(members[g]) for g in lesions)
        taken = 0
        for g in lesions:
            size = len(members[g])
            if abs(taken + size - target) < abs(taken - target):
                test_rows.append(members[g])
                taken += size
    is_test = np.zeros(len(lesion_ids), dtype=bool)
    if test_rows:
        is_test[np.concatenate(test_rows)] = True
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def _cache_key(index: HamIndex, kind: str, size: int) -> str:
    """A digest of the data folder, the image ids (so ``--limit`` matters), the kind and size."""
    digest = hashlib.sha256(f"{index.root}\n{kind}\n{size}\n".encode())
    digest.update("\n".join(index.image_ids).encode())
    return digest.hexdigest()[:16]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file and a rename (no half-written cache)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_cached(
    index: HamIndex,
    size: int,
    cache_dir: str | Path,
    *,
    masks: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """The images (uint8 [N, size, size, 3]) or masks (uint8 [N, size, size] in {0, 1}) of
    ``index``, decoded once and cached as ``.npy`` in ``cache_dir``, keyed by data folder, image
    ids and size (a rerun reads the cache in about a second)."""
    kind = "masks" if masks else "images"
    path = Path(cache_dir) / f"{kind}-{size}px-{_cache_key(index, kind, size)}.npy"
    if path.is_file():
        return np.load(path)
    if masks:
        if any(m is None for m in index.mask_paths):
            raise FileNotFoundError("some images have no mask: use HamIndex.with_masks() first")
        array = load_masks([m for m in index.mask_paths if m is not None], size)
    else:
        array = load_images(list(index.image_paths), size, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_npy_atomic(path, array)
    return array


@dataclass
class LoadedData:
    """A HAM10000 selection held in memory at one image size: images uint8 [N, s, s, 3] with
    class targets int64 [N] (classification) or masks uint8 [N, s, s] (segmentation)."""

    index: HamIndex
    images: np.ndarray
    targets: np.ndarray | None
    masks: np.ndarray | None
    num_classes: int

    def dataset(self, rows: np.ndarray, labeled: bool = True) -> ImageDataset:
        """An :class:`ImageDataset` of ``rows`` (with their targets or masks when labeled)."""
        t = self.targets[rows] if labeled and self.targets is not None else None
        m = self.masks[rows] if labeled and self.masks is not None else None
        return ImageDataset(self.images[rows], targets=t, masks=m)


def task_index(
    data_dir: str | Path,
    task: Task,
    *,
    masks_dir: str | Path | None = None,
    limit: int | None = None,
) -> HamIndex:
    """Index the folder for ``task`` (segmentation: only images with a mask) and keep ``limit``
    images (whole lesions)."""
    index = read_ham10000(data_dir, masks_dir)
    if task == "segmentation":
        index = index.with_masks()
        if len(index) == 0:
            raise FileNotFoundError("no masks: pass --masks DIR of <image_id>_segmentation.png")
    return index if limit is None else limit_by_lesion(index, limit)


def load_ham10000(
    data_dir: str | Path,
    task: Task,
    size: int,
    cache_dir: str | Path,
    *,
    masks_dir: str | Path | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> LoadedData:
    """:func:`task_index` of the folder, loaded at ``size`` through the ``.npy`` cache in
    ``cache_dir``."""
    index = task_index(data_dir, task, masks_dir=masks_dir, limit=limit)
    images = load_cached(index, size, cache_dir, progress=progress)
    if task == "segmentation":
        return LoadedData(index, images, None, load_cached(index, size, cache_dir, masks=True), 1)
    return LoadedData(index, images, index.labels, None, len(index.classes))


def stratified_lesion_rows(
    lesion_ids: np.ndarray, labels: np.ndarray, limit: int, seed: int = 0
) -> np.ndarray:
    """Sorted rows of whole lesions holding at most ``limit`` images, each class (``labels``; one
    lesion has one class) getting its share of ``limit`` in proportion to its image count, and at
    least one lesion while the limit allows. Seeded (the same subset for every run seed).

    Classes are filled from the rarest up, each from a seeded random order of its lesions; what a
    class leaves unused (lesion sizes do not add up to its share) passes to the next, so the most
    common class takes up the rest."""
    lesion_ids, labels = np.asarray(lesion_ids), np.asarray(labels)
    if limit >= len(lesion_ids):
        return np.arange(len(lesion_ids), dtype=np.int64)
    _, members = _groups(lesion_ids)
    lesion_class = np.array([labels[m[0]] for m in members])
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    left, left_count = limit, len(labels)
    for c in np.argsort(counts, kind="stable"):
        lesions = rng.permutation(np.flatnonzero(lesion_class == classes[c]))
        smallest = min(len(members[g]) for g in lesions)
        share = min(left, max(round(left * counts[c] / left_count), smallest))
        taken = 0
        for g in lesions:
            if taken + len(members[g]) <= share:
                chosen.append(members[g])
                taken += len(members[g])
        left, left_count = left - taken, left_count - counts[c]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def limit_by_lesion_stratified(index: HamIndex, limit: int, seed: int = 0) -> HamIndex:
    """:func:`limit_by_lesion`, but stratified by class (:func:`stratified_lesion_rows`): a small
    ``limit`` still has every class in its proportion."""
    if limit >= len(index):
        return index
    return index.subset(stratified_lesion_rows(index.lesion_ids, index.labels, limit, seed))
