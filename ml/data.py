"""Loading images and masks into memory, and the torch data set the models train on.

Everything is held in memory as uint8 at model resolution: at 64 px a 10,000-image pool is
about 120 MB, and decoding JPEGs once instead of every epoch is what makes CPU training viable.

Two ways to feed a model:

- :class:`ImageDataset` through a ``DataLoader``: one sample at a time, augmented and normalised
  on the CPU (the training default on the CPU);
- on the model's device, batch by batch: :func:`device_batches` (a set in order, no
  augmentation: scoring and evaluation) and :class:`DeviceBatches` (training epochs: the uint8
  set is copied to the device once, and each batch is gathered, augmented with the batched
  policies of :mod:`ml.augment` and normalised there; the training default on a GPU, where a
  per-sample loader on the CPU cannot keep up).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ml.augment import (
    DERM_JITTER,
    DERM_RATIO,
    DERM_SCALE,
    POLICIES,
    AugmentPolicy,
    DermAugment,
    flip_augment,
    jitter_colour,
    random_affine,
    random_colour,
    random_hflip,
    warp,
)

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
        image = normalise(pixels.float().div_(255.0))
        target: torch.Tensor
        if mask is not None:
            target = mask.float()
        elif self.targets is not None:
            target = torch.tensor(self.targets[index], dtype=torch.int64)
        else:
            target = torch.tensor(-1, dtype=torch.int64)
        return image.contiguous(), target.contiguous(), index


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's constants on ``device``, copied there once (a blocking copy to a GPU
    waits for all its queued work)."""
    return _MEAN.to(device), _STD.to(device)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Float ``[..., 3, H, W]`` in [0, 1] -> ImageNet-normalised, on ``x``'s device (the same
    arithmetic as :meth:`ImageDataset.__getitem__`, so the same values on the CPU)."""
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def channels_first(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [0, 1] (a strided view's copy)."""
    return pixels.permute(0, 3, 1, 2).float().div_(255.0)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, without waiting for the GPU's
    queued work (a blocking copy would wait for all of it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def model_layout(x: torch.Tensor) -> torch.Tensor:
    """A batch in the memory layout the model runs fastest on: channels-last on a GPU (tensor
    cores), contiguous channels-first on the CPU (the layout the CPU results were made with)."""
    if x.device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def device_batches(
    data: ImageDataset, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """``data``'s images in order, without augmentation, as normalised float32 batches
    ``[B, 3, H, W]`` made on ``device`` from uint8 copies (a quarter of the bytes of float)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    for start in range(0, len(data), batch_size):
        pixels = torch.from_numpy(data.images[start : start + batch_size]).to(device)
        yield model_layout(normalise(channels_first(pixels)))


class DeviceBatches:
    """Training batches made on ``device`` from a labeled set copied there once as uint8.

    Each epoch (one pass of ``iter``) draws, from ``generator`` (a CPU generator the training
    loop seeds per epoch), the order (a permutation, or with ``weights`` ``[N]`` as many draws
    with replacement, as ``WeightedRandomSampler``) and every sample's augmentation (the set's
    policy, batched: :mod:`ml.augment`), and copies the draws to the device in one go: within an
    epoch nothing waits for the device. Yields ``(images, targets, indices)`` as the
    ``DataLoader`` over the set does, on the device: images normalised float32
    ``[B, 3, S, S]``; targets int64 ``[B]`` or float32 masks ``[B, 1, S, S]``. ``drop_single``
    drops a last batch of exactly one sample (BatchNorm cannot train on it), and only that.
    """

    def __init__(
        self,
        data: ImageDataset,
        *,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        drop_single: bool = False,
    ) -> None:
        if not data.labeled:
            raise ValueError("DeviceBatches trains on a labeled set")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.device, self.batch_size, self.generator = device, batch_size, generator
        self.augment, self.size = data.augment, data.image_size[0]
        self.weights, self.drop_single = weights, drop_single
        self.images = torch.from_numpy(data.images).to(device)
        self.targets = None if data.targets is None else torch.from_numpy(data.targets).to(device)
        self.masks = None if data.masks is None else torch.from_numpy(data.masks).to(device)
        self.n = len(data)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and not self.drop_single) else 0)

    def _draws(self) -> dict[str, torch.Tensor]:
        g, n = self.generator, self.n
        if self.weights is not None:
            order = torch.multinomial(self.weights, n, replacement=True, generator=g)
        else:
            order = torch.randperm(n, generator=g)
        draws = {"order": order}
        if self.augment == "derm":
            draws["theta"] = random_affine(n, g, DERM_SCALE, DERM_RATIO, tries=10)
            draws["colour"] = random_colour(n, g, DERM_JITTER)
        elif self.augment == "flip":
            draws["flip"] = random_hflip(n, g)
        return {k: to_device(v, self.device) for k, v in draws.items()}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        draws = self._draws()
        for b in range(len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.batch(draws["order"][part], {k: v[part] for k, v in draws.items()})

    def batch(
        self, idx: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The samples ``idx`` (on the device) with their ``draws``, augmented and normalised."""
        x = channels_first(self.images[idx])
        mask = None if self.masks is None else self.masks[idx].unsqueeze(1).float()
        if "theta" in draws:
            x, mask = warp(x, draws["theta"], self.size, mask)
            x = jitter_colour(x, draws["colour"])
        elif "flip" in draws:
            flip = draws["flip"].view(-1, 1, 1, 1)
            x = torch.where(flip, x.flip(-1), x)
            mask = None if mask is None else torch.where(flip, mask.flip(-1), mask)
        if mask is None:
            assert self.targets is not None  # a labeled set has class targets or masks
            return model_layout(normalise(x)), self.targets[idx], idx
        return model_layout(normalise(x)), mask, idx
