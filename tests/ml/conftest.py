"""Synthetic seeded data for the ml tests: coloured blobs (classification), discs (segmentation)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ml.data import ImageDataset

COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220]], dtype=np.float64)


def _disc(size: int, rng: np.random.Generator) -> np.ndarray:
    """A bool [size, size] disc of random centre and radius."""
    yy, xx = np.mgrid[:size, :size]
    r = rng.uniform(size * 0.15, size * 0.3)
    cy, cx = rng.uniform(r, size - r, 2)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def blob_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images uint8 [n, size, size, 3] on a noisy grey ground, each with one disc whose
    colour is its class (3 classes, balanced); returns (images, classes int64 [n])."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % 3
    rng.shuffle(classes)
    images = rng.normal(128, 20, (n, size, size, 3))
    for i, c in enumerate(classes):
        images[i][_disc(size, rng)] = COLOURS[c] + rng.normal(0, 15, 3)
    return np.clip(images, 0, 255).astype(np.uint8), classes.astype(np.int64)


def disc_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images with one dark-brown disc each (a toy lesion) and its mask uint8 [n, size, size]."""
    rng = np.random.default_rng(seed)
    images = rng.normal([200, 170, 150], 15, (n, size, size, 3))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        disc = _disc(size, rng)
        images[i][disc] = rng.normal([90, 60, 40], 15, (int(disc.sum()), 3))
        masks[i] = disc
    return np.clip(images, 0, 255).astype(np.uint8), masks


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models gain little from more, and the suite shares its
    2 cores with other suites, where OpenMP barriers over busy cores slow down ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def blobs() -> tuple[ImageDataset, ImageDataset]:
    """(train: 240 labeled 32-px blob images, test: 90 more)."""
    images, classes = blob_images(330, 32, seed=1)
    return ImageDataset(images[:240], targets=classes[:240]), ImageDataset(
        images[240:], targets=classes[240:]
    )


@pytest.fixture(scope="session")
def discs() -> tuple[ImageDataset, ImageDataset]:
    """(train: 96 labeled 32-px disc images, test: 32 more)."""
    images, masks = disc_images(128, 32, seed=2)
    return ImageDataset(images[:96], masks=masks[:96]), ImageDataset(images[96:], masks=masks[96:])
