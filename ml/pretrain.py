"""Self-supervised warm start: SimCLR pretraining of a ResNet-18 on unlabeled pool images.

Method: SimCLR (Chen et al. 2020). Two random views of every image go through the backbone and
a 2-layer projection head; the NT-Xent loss pulls the two views of one image together and
pushes the other images of the batch away. The loss and the head are ``lightly``'s
(``lightly.loss.NTXentLoss``, ``lightly.models.modules.SimCLRProjectionHead``); the backbone is
torchvision's ``resnet18(weights=None)`` with ``fc`` replaced by the identity, so its
state_dict has torchvision's key names without ``fc.*`` and loads with
:func:`ml.models.load_resnet_weights` into the classifier and into the U-Net's encoder
(``TrainConfig.weights_path``).

Views (:func:`make_views`, with the batched policies of :mod:`ml.augment`) are made on whole
uint8 batches, on the training device (on a GPU the pool is held there when it takes at most a
quarter of the free memory, and the draws go over through pinned memory, so making the views
waits for nothing; lightly's NT-Xent loss still waits twice per step, for its boolean-mask
indexing, and fp16 loss scaling once), with one random draw per sample: a random resized
crop, flips on both axes and a 90-degree rotation are one affine map per sample
(``affine_grid`` + ``grid_sample``, bilinear), then colour jitter (brightness, contrast,
saturation; and hue, off by default as in :mod:`ml.augment`, as a per-sample rotation in YIQ
space) with probability ``color_p``, then the ImageNet normalisation of :mod:`ml.data`.
torchvision's random ``transforms.v2`` draw one parameter set per call, so on a batch every
image would get the same view, and per-image calls in a Python loop are several times slower on
the CPU; the v2 functional kernels (grayscale) are used where they take batches.

Determinism: the networks are initialised under ``seed`` (in a forked RNG, the global
generator is left as it was) and every epoch draws its order and its views from a generator
seeded with ``ml.train.epoch_seed(seed, epoch)``; nothing else is random. So on the CPU the same
inputs give bit-identical weights, and a run resumed from an epoch-k checkpoint ends where the
uninterrupted run ends.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torchvision.models import resnet18
from torchvision.transforms.v2 import functional as TF

from ml.augment import jitter_colour, random_affine, random_colour, warp
from ml.data import IMAGENET_MEAN, IMAGENET_STD, channels_first, normalise, to_device
from ml.train import (
    DEVICE_SET_SHARE,
    TrainingCancelled,
    amp_dtype,
    check_resumable,
    epoch_seed,
    gpu_free_bytes,
    resolve_device,
)

PRETRAIN_FORMAT = "coreloop.ml.pretrain/1"
# Config fields that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = frozenset({"device", "amp"})

# Throughput of :func:`pretrain_backbone` (images per second, two views each) at 64 px, batch
# 128. CPU: measured 38 images per CPU-second on one thread (512 HAM10000 pool images, one
# epoch), so ~65/s on two dedicated cores; a CPU shared with other work gets less (15.8/s wall
# at a load average of 9 on 2 cores). GPU: an estimate (not measured), the cap of 200 epochs
# applies to any pool under ~18,000 images.
CPU_IMAGES_PER_SECOND = 65.0
GPU_IMAGES_PER_SECOND = 6000.0
DEFAULT_BUDGET_SECONDS = 600.0


class PretrainCancelled(TrainingCancelled):
    """``should_stop()`` returned True; raised between batches (nothing half-updated)."""


@dataclass
class PretrainConfig:
    """SimCLR settings. ``image_size``: the views' size (the rounds' ``image_size``)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    image_size: int = 64
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    temperature: float = 0.2
    projection_hidden_dim: int = 512
    projection_dim: int = 128
    # Views.
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0  # as ml.augment: a lesion's hue is diagnostic; > 0 turns it per sample


@dataclass
class PretrainResult:
    """``state_dict``: the ResNet-18 backbone (torchvision keys, no ``fc``), on the CPU;
    ``history``: one metrics dict per epoch; ``checkpoint``: the final resumable state."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    checkpoint: dict[str, Any] = field(default_factory=dict)


def default_epochs(device: str = "auto", n_images: int = 8000, image_size: int = 64) -> int:
    """Epochs that take about ``DEFAULT_BUDGET_SECONDS`` (10 minutes): from the measured
    throughput on the 2-core CPU (or an estimate for a GPU), scaled by the pixel count, for a
    pool of ``n_images``; at least 1, at most 200."""
    on_gpu = resolve_device(device).type == "cuda"
    rate = GPU_IMAGES_PER_SECOND if on_gpu else CPU_IMAGES_PER_SECOND
    rate *= (64.0 / image_size) ** 2
    epochs = DEFAULT_BUDGET_SECONDS * rate / max(n_images, 1)
    return int(min(200, max(1, round(epochs))))


def build_backbone() -> nn.Module:
    """torchvision's ResNet-18 (no weights) with ``fc`` replaced by the identity: 512-d out."""
    net = resnet18(weights=None)
    net.fc = nn.Identity()
    return net


def make_views(
    images: torch.Tensor, config: PretrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """One random view of each image: uint8 ``[B, H, W, 3]`` (any device) -> normalised float32
    ``[B, 3, S, S]`` with ``S = config.image_size``, on the images' device. The random draws
    come from ``generator`` (a CPU generator; B draws per call, in a fixed order)."""
    device, n, size = images.device, images.shape[0], config.image_size
    theta = to_device(random_affine(n, generator, config.crop_scale, config.crop_ratio), device)
    jitter = (config.brightness, config.contrast, config.saturation, config.hue)
    colour = to_device(random_colour(n, generator, jitter, config.color_p), device)
    x, _ = warp(channels_first(images), theta, size)
    x = jitter_colour(x, colour, hue=config.hue > 0)
    return normalise(x)


@dataclass
class _Pretrainer:
    backbone: nn.Module
    head: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    batch_size: int
    steps_per_epoch: int

    def state(self, epoch: int, config: PretrainConfig, history: list[dict[str, float]]) -> dict:
        """A resumable checkpoint after ``epoch`` completed epochs (tensors on the CPU)."""
        return {
            "format": PRETRAIN_FORMAT,
            "backbone": _cpu(self.backbone.state_dict()),
            "head": _cpu(self.head.state_dict()),
            "optimizer": _cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "config": _plain_config(config),
            "history": [dict(h) for h in history],
        }

    def restore(self, state: dict, config: PretrainConfig) -> int:
        if state.get("format") != PRETRAIN_FORMAT:
            raise ValueError(f"not a pretraining checkpoint (format {state.get('format')!r})")
        check_resumable(state["config"], _plain_config(config), _RESUMABLE_CHANGES)
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])


def _plain_config(config: PretrainConfig) -> dict[str, Any]:
    """The config as plain values (tuples as lists: what a weights_only load gives back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _make_pretrainer(n_images: int, config: PretrainConfig) -> _Pretrainer:
    device = resolve_device(config.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = build_backbone()
        head = SimCLRProjectionHead(
            input_dim=512,
            hidden_dim=config.projection_hidden_dim,
            output_dim=config.projection_dim,
        )
    backbone.to(device)
    head.to(device)
    if device.type == "cuda":
        backbone.to(memory_format=torch.channels_last)
    batch_size = min(config.batch_size, n_images)
    steps_per_epoch = n_images // batch_size  # the last partial batch is dropped
    total = max(1, config.epochs * steps_per_epoch)
    warmup = max(1, round(config.warmup_fraction * total)) if config.warmup_fraction > 0 else 0

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(step - warmup, total - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * done))

    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = NTXentLoss(temperature=config.temperature)
    return _Pretrainer(
        backbone,
        head,
        criterion,
        optimizer,
        scheduler,
        scaler,
        device,
        dtype,
        batch_size,
        steps_per_epoch,
    )


def _pretrain_one_epoch(
    t: _Pretrainer,
    pool: torch.Tensor,
    config: PretrainConfig,
    epoch: int,
    should_stop: Callable[[], bool] | None,
) -> dict[str, float]:
    g = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    order = to_device(torch.randperm(pool.shape[0], generator=g), pool.device)
    t.backbone.train()
    t.head.train()
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for step in range(t.steps_per_epoch):
        if should_stop is not None and should_stop():
            raise PretrainCancelled(f"cancelled during epoch {epoch + 1}")
        idx = order[step * t.batch_size : (step + 1) * t.batch_size]
        batch = pool[idx]
        if batch.device != t.device:  # a pool too large for the GPU: pinned, copied async
            batch = batch.pin_memory().to(t.device, non_blocking=True)
        x0 = make_views(batch, config, g)
        x1 = make_views(batch, config, g)
        if t.device.type == "cuda":
            x0 = x0.contiguous(memory_format=torch.channels_last)
            x1 = x1.contiguous(memory_format=torch.channels_last)
        with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
            z0 = t.head(t.backbone(x0))
            z1 = t.head(t.backbone(x1))
        loss = t.criterion(z0.float(), z1.float())
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        total += loss.detach()
    return {"loss": float(total) / max(1, t.steps_per_epoch)}


def pretrain_backbone(
    images: np.ndarray,
    config: PretrainConfig,
    *,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: dict | None = None,
    checkpoint_every: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """SimCLR-pretrain a ResNet-18 on ``images`` (uint8 ``[N, H, W, 3]``, unlabeled; it sees
    nothing else, so pass pool images only, never test images).

    Per epoch: ``history`` gets ``epoch`` (1-based), ``loss`` (mean NT-Xent over the batches),
    ``lr`` (at the epoch's end), ``seconds``, ``images_per_second``; then
    ``checkpoint_every(state)`` receives a resumable state and ``on_epoch(epoch, epochs,
    metrics)`` is called. ``should_stop`` is polled before every batch; True raises
    :class:`PretrainCancelled`. ``resume``: a state from ``checkpoint_every`` (same images and
    settings; only ``device`` and ``amp`` may differ).
    """
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    if images.shape[0] < 2:
        raise ValueError("pretraining needs at least 2 images")
    if config.epochs < 0:
        raise ValueError("epochs must be >= 0")
    t = _make_pretrainer(images.shape[0], config)
    pool = torch.from_numpy(np.ascontiguousarray(images))
    # On the GPU when it fits (the training loader's rule).
    if t.device.type == "cuda" and pool.nbytes <= DEVICE_SET_SHARE * gpu_free_bytes(t.device):
        pool = pool.to(t.device)
    history: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        start = t.restore(resume, config)
        history = [dict(h) for h in resume["history"]]
    state = t.state(start, config, history)
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        metrics = {"epoch": float(epoch + 1)}
        metrics.update(_pretrain_one_epoch(t, pool, config, epoch, should_stop))
        metrics["lr"] = float(t.scheduler.get_last_lr()[0])
        metrics["seconds"] = time.perf_counter() - began
        metrics["images_per_second"] = t.steps_per_epoch * t.batch_size / metrics["seconds"]
        history.append(metrics)
        state = t.state(epoch + 1, config, history)
        if checkpoint_every is not None:
            checkpoint_every(state)
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs, metrics)
    t.backbone.eval()
    return PretrainResult(state["backbone"], history, state)


def pretrain_cached(
    images: np.ndarray,
    config: PretrainConfig,
    cache_dir: str | Path,
    *,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> Path:
    """The backbone of :func:`pretrain_backbone` on ``images`` as a state_dict file (for
    ``TrainConfig.weights_path``), pretrained once per images and settings: the file
    ``warm-start-<digest>.pt`` in ``cache_dir`` is keyed by the images' bytes and the config
    (device and amp left out), so a benchmark that runs many strategies on one pool pretrains
    once. Written atomically (:func:`ml.checkpoint.save_checkpoint`)."""
    from ml.checkpoint import save_checkpoint

    settings = {k: v for k, v in _plain_config(config).items() if k not in _RESUMABLE_CHANGES}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).data)
    path = Path(cache_dir) / f"warm-start-{digest.hexdigest()[:16]}.pt"
    if not path.is_file():
        result = pretrain_backbone(images, config, on_epoch=on_epoch)
        save_checkpoint(path, result.state_dict)
    return path


@torch.no_grad()
def embed_images(
    images: np.ndarray,
    state_dict: dict[str, torch.Tensor] | None,
    *,
    batch_size: int = 256,
    device: str = "auto",
) -> np.ndarray:
    """512-d backbone features (float32 ``[N, 512]``) of uint8 ``[N, H, W, 3]`` images, with
    the ImageNet normalisation of :mod:`ml.data`; ``state_dict`` from :func:`pretrain_backbone`
    (None: a randomly initialised backbone, seeded 0)."""
    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_backbone()
    if state_dict is not None:
        net.load_state_dict(state_dict)
    net.to(dev).eval()
    out = np.empty((images.shape[0], 512), dtype=np.float32)
    for start in range(0, images.shape[0], batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).to(dev)
        x = chunk.permute(0, 3, 1, 2).float().div_(255.0)
        x = TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
        out[start : start + x.shape[0]] = net(x).float().cpu().numpy()
    return out
