"""Loading images and masks into memory, and the torch data set the models train on.

Everything is held in memory as uint8 at model resolution: at 64 px a 10,000-image pool is
about 120 MB, and decoding JPEGs once instead of every epoch is what makes CPU training viable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ml.augment import POLICIES, AugmentPolicy, DermAugment, flip_augment

Task = Literal["classification", "segmentation"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Read an image as RGB and resize it to ``size x size`` (bilinear; aspect not kept, as in
    the paper, which resizes to 224x224). Returns uint8 ``[size, size, 3]``."""
    with Image.open(path) as img:
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8).copy()


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """Read a binary mask and resize it to ``size x size`` (nearest). Returns uint8
    ``[size, size]`` in {0, 1}.

    Masks stored as 0/255 (ISIC) are thresholded at > 127; masks whose values are all in {0, 1}
    (already binary) are kept as they are, so both conventions load the same.
    """
    with Image.open(path) as img:
        grey = img.convert("L")
        full = np.asarray(grey)
        small = np.asarray(grey.resize((size, size), Image.Resampling.NEAREST))
    threshold = 0 if full.max() <= 1 else 127
    return (small > threshold).astype(np.uint8)


def load_images(paths: Sequence[str | Path], size: int, progress: bool = False) -> np.ndarray:
    """Load many images with :func:`load_image`. Returns uint8 ``[N, size, size, 3]``."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    iterator = tqdm(paths, desc="loading images", unit="img") if progress else paths
    for i, path in enumerate(iterator):
        out[i] = load_image(path, size)
    return out


def load_masks(paths: Sequence[str | Path], size: int) -> np.ndarray:
    """Load many masks with :func:`load_mask`. Returns uint8 ``[N, size, size]`` in {0, 1}."""
    out = np.empty((len(paths), size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = load_mask(path, size)
    return out


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    """Images held in memory as uint8 ``[N, H, W, 3]``, with targets int64 ``[N]``
    (classification), or masks uint8 ``[N, H, W]`` in {0, 1} (segmentation), or neither
    (an unlabeled pool).

    ``__getitem__`` returns ``(image, target, index)``: image float32 ``[3, H, W]`` normalised
    with the ImageNet mean/std; target an int64 scalar tensor (class), a float32 ``[1, H, W]``
    mask, or the int64 scalar -1 when the set is unlabeled.

    ``augment`` is a policy of :mod:`ml.augment`: ``"derm"`` (flips on both axes, 90-degree
    rotations, a random resized crop and colour jitter; masks follow the geometric steps),
    ``"flip"`` (the paper's horizontal flip, p = 0.5) or ``"none"``; True means ``"derm"`` and
    False ``"none"``. Augmentation runs on the uint8 image before normalisation. Its draws come
    from torch's global generator, so a training loop that seeds it per epoch gets the same
    augmentations on every run (and in DataLoader workers, whose seeds derive from the loader's
    generator).
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray | None = None,
        masks: np.ndarray | None = None,
        augment: AugmentPolicy | bool = False,
    ) -> None:
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        if targets is not None and masks is not None:
            raise ValueError("give targets (classification) or masks (segmentation), not both")
        n = images.shape[0]
        if targets is not None and targets.shape != (n,):
            raise ValueError(f"targets must be [N]={n}, got {targets.shape}")
        if masks is not None and masks.shape != images.shape[:3]:
            raise ValueError(f"masks must be [N,H,W]={images.shape[:3]}, got {masks.shape}")
        self.images = images
        self.targets = None if targets is None else targets.astype(np.int64, copy=False)
        self.masks = None if masks is None else masks.astype(np.uint8, copy=False)
        if isinstance(augment, bool):
            augment = "derm" if augment else "none"
        if augment not in POLICIES:
            raise ValueError(f"augment must be one of {POLICIES}, got {augment!r}")
        self.augment: AugmentPolicy = augment
        self._derm = DermAugment(images.shape[1]) if augment == "derm" else None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the stored images."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def labeled(self) -> bool:
        return self.targets is not None or self.masks is not None

    def check_labels(self, task: Task, num_classes: int) -> None:
        """Raise ValueError unless the labels fit ``task``: classes in ``[0, num_classes)``
        (an out-of-range class would otherwise trip a CUDA device assert) or masks in {0, 1}."""
        if task == "classification":
            if self.targets is None:
                raise ValueError("classification needs class targets")
            if (
                len(self.targets)
                and not 0 <= self.targets.min() <= self.targets.max() < num_classes
            ):
                raise ValueError(f"class targets must lie in [0, {num_classes})")
        else:
            if self.masks is None:
                raise ValueError("segmentation needs masks")
            if self.masks.size and self.masks.max() > 1:
                raise ValueError("masks must hold 0 and 1 only")

    def with_augment(self, augment: AugmentPolicy | bool) -> ImageDataset:
        """The same arrays (not copied) with another augmentation policy (False: none)."""
        return ImageDataset(self.images, self.targets, self.masks, augment=augment)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        pixels = torch.from_numpy(self.images[index]).permute(2, 0, 1)
        mask = None if self.masks is None else torch.from_numpy(self.masks[index]).unsqueeze(0)
        if self._derm is not None:
            pixels, mask = self._derm(pixels, mask)
        elif self.augment == "flip":
            pixels, mask = flip_augment(pixels, mask)
        image = (pixels.float().div_(255.0) - _MEAN) / _STD
        target: torch.Tensor
        if mask is not None:
            target = mask.float()
        elif self.targets is not None:
            target = torch.tensor(self.targets[index], dtype=torch.int64)
        else:
            target = torch.tensor(-1, dtype=torch.int64)
        return image.contiguous(), target.contiguous(), index
