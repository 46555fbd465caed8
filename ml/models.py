"""Target models with taps, and the loss-prediction module (the paper's uncertainty predictor G).

Kim, Mushtaq & Navab, "Confident Coreset for Active Learning in Medical Image Analysis"
(arXiv:2004.02200), sections 2.1 and 3.2; the module follows Yoo & Kweon, "Learning Loss for
Active Learning" (CVPR 2019) and their code
(github.com/Mephisto405/Learning-Loss-for-Active-Learning).

- classification: torchvision ResNet-18, taps on ``layer1..layer4`` (the paper's blocks 2-5);
- segmentation: U-Net with a ResNet-18 encoder (segmentation-models-pytorch), taps on the last
  four encoder stages (64, 128, 256, 512 channels).

Both give the 512-d global-average-pooled output of the last encoder block as the feature for
k-center distances.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet, resnet18

from ml.data import Task

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a weights request fails fast instead of retrying
import segmentation_models_pytorch as smp  # noqa: E402

SegLoss = Literal["dice", "dice_bce"]
TAP_CHANNELS = (64, 128, 256, 512)
FEATURE_DIM = 512


@dataclass
class ModelOutput:
    """logits ``[B, C]`` (classification) or ``[B, 1, H, W]`` (segmentation, before sigmoid);
    features ``[B, 512]``; predicted_loss ``[B]`` (the module's score, on no fixed scale)."""

    logits: torch.Tensor
    features: torch.Tensor
    predicted_loss: torch.Tensor


class LossPredictionModule(nn.Module):
    """Yoo & Kweon's loss-prediction module: per tapped map GAP -> FC(hidden) -> ReLU, concat,
    FC -> scalar. Input: a list of maps ``[B, C_k, H_k, W_k]``; output ``[B]``."""

    def __init__(self, channels: Sequence[int] = TAP_CHANNELS, hidden: int = 128) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(c, hidden) for c in channels)
        self.head = nn.Linear(hidden * len(channels), 1)

    def forward(self, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(taps) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} tapped maps, got {len(taps)}")
        pooled = [
            F.relu(fc(torch.flatten(F.adaptive_avg_pool2d(t, 1), 1)))
            for fc, t in zip(self.branches, taps, strict=True)
        ]
        return self.head(torch.cat(pooled, dim=1)).squeeze(1)


class ActiveModel(nn.Module):
    """A target model plus its loss-prediction module.

    ``forward(x, detach_taps)``: x float32 ``[B, 3, H, W]`` (H, W multiples of 32 for the U-Net)
    -> :class:`ModelOutput`. ``detach_taps=True`` feeds the module detached maps, so the ranking
    loss no longer reaches the backbone (Yoo's code does this after 60% of the epochs).
    """

    task: Task
    num_classes: int

    def __init__(self, task: Task, num_classes: int, backbone: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.num_classes = num_classes
        self.backbone = backbone
        self.loss_module = LossPredictionModule(TAP_CHANNELS)

    def _classification_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = cast(ResNet, self.backbone)
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        taps: list[torch.Tensor] = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            taps.append(h)
        return net.fc(torch.flatten(net.avgpool(h), 1)), taps

    def _segmentation_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        net = cast(Any, self.backbone)  # smp.Unet (untyped)
        maps = net.encoder(x)  # 6 maps: the input, then 64, 64, 128, 256, 512 channels
        logits = net.segmentation_head(net.decoder(maps))
        return logits, list(maps[-4:])

    def forward(self, x: torch.Tensor, detach_taps: bool = False) -> ModelOutput:
        if self.task == "classification":
            logits, taps = self._classification_forward(x)
        else:
            logits, taps = self._segmentation_forward(x)
        features = torch.flatten(F.adaptive_avg_pool2d(taps[-1], 1), 1)
        lp_inputs = [t.detach() for t in taps] if detach_taps else taps
        return ModelOutput(logits, features, self.loss_module(lp_inputs))

    @property
    def resnet(self) -> ResNet:
        """The ResNet-18 (the classifier itself, or the U-Net's encoder, a ResNet subclass)."""
        net = self.backbone if self.task == "classification" else cast(Any, self.backbone).encoder
        return cast(ResNet, net)


def load_resnet_weights(resnet: nn.Module, weights_path: str | Path) -> None:
    """Load a ResNet-18 state_dict (e.g. torchvision's ImageNet file) into ``resnet``.

    The ``fc.*`` keys are skipped when their shapes differ (another number of classes) or the
    network has no fc (the U-Net encoder). Any other missing or unexpected key is an error, so a
    wrong file is not loaded silently.
    """
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = resnet.state_dict()
    missing = sorted(k for k in own.keys() - state.keys() if not k.startswith("fc."))
    unexpected = sorted(k for k in state.keys() - own.keys() if not k.startswith("fc."))
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} is not a ResNet-18 state_dict: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    kept = {
        k: v
        for k, v in state.items()
        if k in own and not (k.startswith("fc.") and own[k].shape != v.shape)
    }
    # nn.Module's own method: smp's encoder overrides load_state_dict and returns nothing.
    nn.Module.load_state_dict(resnet, kept, strict=False)


def build_model(
    task: Task, num_classes: int, weights_path: str | Path | None = None
) -> ActiveModel:
    """Build a freshly initialised model (``weights=None``, nothing downloaded).

    ``num_classes``: the number of classes (classification) or 1 (segmentation: one binary
    lesion mask). ``weights_path``: an optional local ResNet-18 state_dict loaded into the
    classifier or the U-Net encoder (see :func:`load_resnet_weights`).
    """
    backbone: nn.Module
    if task == "classification":
        if num_classes < 2:
            raise ValueError("classification needs at least 2 classes")
        backbone = resnet18(weights=None, num_classes=num_classes)
    elif task == "segmentation":
        if num_classes != 1:
            raise ValueError("segmentation predicts one binary mask: num_classes must be 1")
        backbone = smp.Unet("resnet18", encoder_weights=None, classes=1)
    else:
        raise ValueError(f"unknown task {task!r}")
    model = ActiveModel(task, num_classes, backbone)
    if weights_path is not None:
        load_resnet_weights(model.resnet, weights_path)
    return model


def ranking_loss(
    predicted: torch.Tensor, target: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """The paper's L_up (eq. 4), with pairs formed as in Yoo's ``LossPredLoss``.

    predicted, target: ``[B]``. Sample i is paired with sample B-1-i
    (``(x - x.flip(0))[:B // 2]``; with an odd B the middle sample is left out), and each pair
    costs ``max(0, -f(l_i, l_j) * (lhat_i - lhat_j) + margin)`` with f = +1 if l_i > l_j else -1.
    The target losses are detached here. Returns the mean over pairs (a scalar); a batch with no
    pair (B < 2) gives a zero that still belongs to the graph.
    """
    half = predicted.shape[0] // 2
    if half == 0:
        return predicted.sum() * 0.0
    pred_diff = (predicted - predicted.flip(0))[:half]
    target_diff = (target - target.flip(0))[:half].detach()
    sign = torch.where(target_diff > 0, 1.0, -1.0).to(pred_diff.dtype)
    return torch.clamp(margin - sign * pred_diff, min=0).mean()


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss: logits, masks ``[B, 1, H, W]`` -> ``[B]``.

    ``1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`` with p = sigmoid(logits),
    summed over each image (the reduction-none Dice the uncertainty predictor needs as target;
    the smoothing term keeps an empty mask with an empty prediction at a loss near 0).
    """
    probs = torch.sigmoid(logits.float()).flatten(1)
    truth = masks.float().flatten(1)
    intersection = (probs * truth).sum(1)
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum(1) + truth.sum(1) + smooth)


def target_loss_per_sample(
    task: Task, logits: torch.Tensor, targets: torch.Tensor, seg_loss: SegLoss = "dice_bce"
) -> torch.Tensor:
    """The target model's loss per sample, ``[B]``: cross-entropy (logits ``[B, C]``, targets
    int64 ``[B]``) or, for masks (logits and masks ``[B, 1, H, W]``), soft Dice (``"dice"``, the
    paper's) or soft Dice + pixel-mean binary cross-entropy (``"dice_bce"``, the default: Dice
    alone gives small lesions a noisy, flat gradient early on; BCE gives every pixel one).
    Computed in float32."""
    if task == "classification":
        return F.cross_entropy(logits.float(), targets, reduction="none")
    dice = soft_dice_loss(logits, targets)
    if seg_loss == "dice":
        return dice
    if seg_loss != "dice_bce":
        raise ValueError(f"seg_loss must be 'dice' or 'dice_bce', got {seg_loss!r}")
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return dice + bce.flatten(1).mean(1)
