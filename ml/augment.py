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

Two implementations of the policies:

- per sample (:class:`DermAugment`, :func:`flip_augment`), for the ``DataLoader`` path (the
  default on the CPU). Every draw comes from torch's global generator, which the training loop
  re-seeds per epoch, so a seeded run repeats exactly on the CPU (``DataLoader`` workers derive
  their seeds from the loader's generator, also seeded);
- batched (:func:`random_affine`, :func:`random_colour`, :func:`warp`, :func:`jitter_colour`),
  for images held on the training device (:class:`ml.data.DeviceBatches`, the default on a
  GPU) and for SimCLR's views (:mod:`ml.pretrain`). The flips, the rotation and the crop are one
  affine map per sample (``affine_grid`` + ``grid_sample``); the draws come from a CPU
  generator the loop seeds per epoch. For training, the same distribution as the per-sample
  version (a crop that does not fit is drawn again, up to 10 times, as torchvision does), with
  two differences: the crop box is not rounded to whole pixels, and the colour steps run in a
  fixed order (torchvision draws the order; the steps commute but for clamping to [0, 1]).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

AugmentPolicy = Literal["none", "flip", "derm"]
POLICIES: tuple[AugmentPolicy, ...] = ("none", "flip", "derm")
# The derm policy: crop area and aspect, and (brightness, contrast, saturation, hue) jitter.
DERM_SCALE = (0.5, 1.0)
DERM_RATIO = (3 / 4, 4 / 3)
DERM_JITTER = (0.2, 0.2, 0.2, 0.0)


def _coin() -> bool:
    return bool(torch.rand(()) < 0.5)


class DermAugment:
    """The ``derm`` policy on one uint8 image ``[3, H, W]`` (and optionally its mask
    ``[1, H, W]``); returns them at the same size and dtype."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = DERM_SCALE,
        jitter: tuple[float, float, float, float] = DERM_JITTER,
    ) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, ratio=DERM_RATIO, antialias=True)
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


# Batched views: one random draw per sample, for whole uint8 batches on any device (the GPU's
# training path, :class:`ml.data.DeviceBatches`, and SimCLR's views in :mod:`ml.pretrain`).
# torchvision's random ``transforms.v2`` draw one parameter set per call, so a batch would get
# one view for all its images; these draw per sample from a CPU generator (so a seeded run draws
# the same on the CPU and on the GPU) and apply the draws on the images' device.

_NO_COLOUR = (1.0, 1.0, 1.0, 0.0)
_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
    dtype=torch.float32,
)


def random_affine(
    n: int,
    g: torch.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int | None = None,
) -> torch.Tensor:
    """Per-sample ``[n, 2, 3]`` maps from output to input coordinates (normalised, -1..1) of a
    square image: a random resized crop of relative area ``scale`` and aspect ``ratio``, after
    a random flip on each axis and a rotation by a multiple of 90 degrees (the 8 symmetries of
    the square). A crop wider or taller than the image: with ``tries`` None it is clamped to the
    image (SimCLR's views); with ``tries`` = k, as torchvision's ``RandomResizedCrop``, each
    sample draws up to k crops and takes the first that fits, else the whole image."""
    lo, hi = scale
    k = 1 if tries is None else tries
    area = lo + (hi - lo) * torch.rand(n, k, generator=g)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, k, generator=g))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    if tries is None:
        w, h = w[:, 0].clamp(max=1.0), h[:, 0].clamp(max=1.0)
    else:
        fits = (w <= 1.0) & (h <= 1.0)
        first = fits.int().argmax(1, keepdim=True)  # the first crop that fits (0 if none)
        some = fits.any(1)
        w = torch.where(some, w.gather(1, first)[:, 0], 1.0)
        h = torch.where(some, h.gather(1, first)[:, 0], 1.0)
    cx = (1.0 - w) * (2.0 * torch.rand(n, generator=g) - 1.0)
    cy = (1.0 - h) * (2.0 * torch.rand(n, generator=g) - 1.0)
    flip = torch.where(torch.rand(n, 2, generator=g) < 0.5, -1.0, 1.0)
    quarter = torch.randint(0, 4, (n,), generator=g)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[quarter]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[quarter]
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    linear = torch.diag_embed(torch.stack([w, h], -1)) @ rot @ torch.diag_embed(flip)
    return torch.cat([linear, torch.stack([cx, cy], -1).unsqueeze(-1)], -1)


def random_colour(
    n: int, g: torch.Generator, jitter: tuple[float, float, float, float], p: float = 1.0
) -> torch.Tensor:
    """Per-sample ``[n, 4]`` factors (brightness, contrast, saturation, hue turn), each drawn
    uniformly within ``1 +- jitter`` (the hue turn within ``+- jitter[3]`` of a full turn);
    with probability ``1 - p`` the identity ``(1, 1, 1, 0)``."""
    u = 2.0 * torch.rand(n, 4, generator=g) - 1.0
    factors = torch.tensor(_NO_COLOUR) + u * torch.tensor(jitter)
    factors[:, :3] = factors[:, :3].clamp(min=0.0)
    keep = torch.rand(n, generator=g) < p
    return torch.where(keep.unsqueeze(1), factors, torch.tensor(_NO_COLOUR))


def random_hflip(n: int, g: torch.Generator) -> torch.Tensor:
    """Per-sample bool ``[n]``: flip horizontally (probability 0.5), the ``flip`` policy."""
    return torch.rand(n, generator=g) < 0.5


def warp(
    images: torch.Tensor, theta: torch.Tensor, size: int, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float ``[B, 3, H, W]`` in [0, 1] (and float masks ``[B, 1, H, W]``) resampled through
    ``theta`` ``[B, 2, 3]`` (:func:`random_affine`) to ``size x size``: bilinear for images,
    nearest for masks, reflection at the edges."""
    grid = F.affine_grid(theta, [images.shape[0], 3, size, size], align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    if masks is not None:
        masks = F.grid_sample(
            masks, grid, mode="nearest", padding_mode="reflection", align_corners=False
        )
    return images, masks


def jitter_colour(x: torch.Tensor, colour: torch.Tensor, hue: bool = False) -> torch.Tensor:
    """Brightness, contrast and saturation (then, with ``hue``, a hue turn) by the per-sample
    factors ``colour`` ``[B, 4]`` (:func:`random_colour`) on float ``[B, 3, H, W]`` in [0, 1],
    clamped to [0, 1] after each step, in this fixed order (torchvision draws the order; without
    the clamps these three steps commute)."""
    n = x.shape[0]
    b, c, s, turn = (colour[:, i].view(n, 1, 1, 1) for i in range(4))
    x = (x * b).clamp_(0.0, 1.0)
    mean = TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * c + mean).clamp_(0.0, 1.0)
    grey = TF.rgb_to_grayscale(x)
    x = ((x - grey) * s + grey).clamp_(0.0, 1.0)
    if hue:
        x = _rotate_hue(x, turn.view(n) * (2.0 * math.pi)).clamp_(0.0, 1.0)
    return x


@functools.cache
def _yiq(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB -> YIQ and its inverse on ``device``, made once (a copy to a GPU, or an inverse
    computed there, waits for its queued work)."""
    return _YIQ.to(device), torch.linalg.inv(_YIQ).to(device)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Turn the hue of ``x`` ``[B, 3, H, W]`` by ``angle`` ``[B]`` radians (rotation of the
    chroma plane in YIQ; luma kept)."""
    yiq, yiq_inv = _yiq(x.device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack(
        [
            torch.stack([one, zero, zero], -1),
            torch.stack([zero, cos, -sin], -1),
            torch.stack([zero, sin, cos], -1),
        ],
        -2,
    )
    matrix = yiq_inv @ rot @ yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", matrix, x)
