"""Training-time augmentation for dermoscopy (torchvision.transforms.v2).

A dermoscopic image has no "up": a lesion photographed at any angle and mirrored is the same
lesion, and the colour of the light, the camera and the skin vary between clinics. So the
``derm`` policy, on by default for training, applies to each sample:

- a horizontal and a vertical flip, each with probability 0.5, and a rotation by a uniformly
  drawn multiple of 90 degrees (together the 8 symmetries of the square: no interpolation, no
  black corners);
- a random resized crop (area ``scale`` 0.5-1.0 of the image, aspect 3/4-4/3) back to the model's
  size: the lesion's scale and position vary between images as well;
- colour jitter (brightness, contrast, saturation 0.2) on the image only. No hue shift: the
  hue of a lesion carries diagnostic information, and it costs 3x the rest on the CPU.

Masks (segmentation) follow every geometric step (nearest-neighbour in the crop) and no colour
step. ``flip`` is the paper's only augmentation (horizontal flip, p = 0.5), kept to compare.

Every draw comes from torch's global generator, which the training loop re-seeds per epoch, so a
seeded run repeats exactly on the CPU (``DataLoader`` workers derive their seeds from the
loader's generator, also seeded).
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

AugmentPolicy = Literal["none", "flip", "derm"]
POLICIES: tuple[AugmentPolicy, ...] = ("none", "flip", "derm")


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


class DermAugment:
    """The ``derm`` policy on one uint8 image ``[3, H, W]`` (and optionally its mask
    ``[1, H, W]``); returns them at the same size and dtype."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.2, 0.0),
    ) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3), antialias=True)
        brightness, contrast, saturation, hue = jitter
        self.color = v2.ColorJitter(brightness, contrast, saturation, hue)

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if _coin():
            image = image.flip(-1)
            mask = None if mask is None else mask.flip(-1)
        if _coin():
            image = image.flip(-2)
            mask = None if mask is None else mask.flip(-2)
        k = int(torch.randint(4, ()))
        if k:
            image = torch.rot90(image, k, dims=(-2, -1))
            mask = None if mask is None else torch.rot90(mask, k, dims=(-2, -1))
        if mask is None:
            image = self.crop(tv_tensors.Image(image))
        else:
            image, mask = self.crop(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image = self.color(image)
        return image.as_subclass(torch.Tensor), None if mask is None else mask.as_subclass(
            torch.Tensor
        )


def flip_augment(
    image: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paper's augmentation: a horizontal flip with probability 0.5."""
    if _coin():
        return image.flip(-1), None if mask is None else mask.flip(-1)
    return image, mask
