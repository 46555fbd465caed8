"""One inference pass over the unlabeled pool: what selection needs, per image.

- ``features``: the 512-d global-average-pooled output of the last ResNet-18 block (the paper's
  k-center representation; Euclidean distances are taken on it);
- ``predicted_loss``: the loss-prediction module's score G(x) (a ranking score, no fixed scale);
- classification: ``probs``, the softmax (for the entropy baseline and pre-annotation);
- segmentation: ``masks``, the predicted lesion mask at model resolution as uint8 {0, 1}
  (sigmoid > 0.5). Binary masks, not probabilities: they are what pre-annotation shows and they
  cost 1 byte per pixel; entropy-style baselines for segmentation would need the probabilities.

Inference runs in float32 (no autocast) so features, hence distances and selections, are as
close as possible between CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ml.data import ImageDataset, device_batches
from ml.models import FEATURE_DIM, ActiveModel
from ml.train import TrainingCancelled, place_model, resolve_device


class ScoringCancelled(TrainingCancelled):
    """``should_stop()`` returned True during :func:`score_pool` (catch ``TrainingCancelled``
    to handle a cancelled round in either phase)."""


@dataclass
class PoolOutput:
    """features float32 ``[N, 512]``; predicted_loss float32 ``[N]``; probs float32 ``[N, C]``
    (classification, else None); masks uint8 ``[N, H, W]`` in {0, 1} (segmentation, else None).
    Row i is ``data[i]``."""

    features: np.ndarray
    predicted_loss: np.ndarray
    probs: np.ndarray | None
    masks: np.ndarray | None


@torch.inference_mode()
def score_pool(
    model: ActiveModel,
    data: ImageDataset,
    *,
    batch_size: int = 64,
    device: str = "auto",
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PoolOutput:
    """Run ``model`` (eval mode, no augmentation) over ``data`` in order.

    ``on_progress(k, N)`` is called with 0 first and after every batch (k images scored so
    far); ``should_stop`` is polled before every batch and True raises :class:`ScoringCancelled`.
    The model is moved to ``device``; its train/eval mode is restored afterwards.
    """
    dev = resolve_device(device)
    total = len(data)
    was_training = model.training
    place_model(model, dev).eval()
    features, losses, heads = [], [], []
    if on_progress is not None:
        on_progress(0, total)
    done = 0
    try:
        for images in device_batches(data, batch_size, dev):
            if should_stop is not None and should_stop():
                raise ScoringCancelled(f"cancelled after {done} of {total} images")
            out = model(images)
            features.append(out.features.float().cpu())
            losses.append(out.predicted_loss.float().cpu())
            if model.task == "classification":
                heads.append(torch.softmax(out.logits.float(), dim=1).cpu())
            else:
                heads.append((out.logits[:, 0] > 0).to(torch.uint8).cpu())
            done += images.shape[0]
            if on_progress is not None:
                on_progress(done, total)
    finally:
        model.train(was_training)
    return _collect(model, data, features, losses, heads)


def _collect(
    model: ActiveModel,
    data: ImageDataset,
    features: list[torch.Tensor],
    losses: list[torch.Tensor],
    heads: list[torch.Tensor],
) -> PoolOutput:
    """Concatenate the per-batch pieces (empty arrays of the right shape for an empty pool)."""
    if not features:
        h, w = data.image_size
        empty_head = (
            np.zeros((0, model.num_classes), np.float32)
            if model.task == "classification"
            else np.zeros((0, h, w), np.uint8)
        )
        heads_np = empty_head
        feats_np, loss_np = np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0,), np.float32)
    else:
        heads_np = torch.cat(heads).numpy()
        feats_np, loss_np = torch.cat(features).numpy(), torch.cat(losses).numpy()
    if model.task == "classification":
        return PoolOutput(feats_np, loss_np, probs=heads_np, masks=None)
    return PoolOutput(feats_np, loss_np, probs=None, masks=heads_np)
