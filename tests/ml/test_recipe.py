"""The training recipe (issue 12): class balance, dermoscopy augmentation, Dice + BCE, the
loss-prediction head, and repeatability (CPU, tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from ml.augment import DermAugment
from ml.data import ImageDataset
from ml.infer import score_pool
from ml.models import soft_dice_loss, target_loss_per_sample
from ml.train import TrainConfig, _make_trainer, class_weights, train_model

from .conftest import COLOURS, _disc, blob_images

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_weights_inverse_frequency() -> None:
    targets = np.array([0] * 6 + [1] * 2 + [3])
    w = class_weights(targets, 4)
    # N / (K * n_c) over the K = 3 present classes: 9/18, 9/6, absent, 9/3.
    assert w.tolist() == pytest.approx([0.5, 1.5, 0.0, 3.0])
    per_sample = w[torch.from_numpy(targets)]
    assert per_sample.mean().item() == pytest.approx(1.0)  # the mean weight per sample is 1
    for c in (0, 1, 3):  # every present class carries the same total weight
        assert per_sample[torch.from_numpy(targets == c)].sum().item() == pytest.approx(3.0)
    half = class_weights(targets, 4, power=0.5)  # part of the way: class totals ~ sqrt(n_c)
    totals = [half[c].item() * n for c, n in ((0, 6), (1, 2), (3, 1))]
    assert totals == pytest.approx([t * 9 / sum(np.sqrt([6, 2, 1])) for t in np.sqrt([6, 2, 1])])
    assert half[torch.from_numpy(targets)].mean().item() == pytest.approx(1.0)


def _imbalanced(n_major: int, n_minor: int, size: int = 32) -> ImageDataset:
    images, _ = blob_images(n_major + n_minor, size, seed=3)
    targets = np.array([0] * n_major + [1] * n_minor)
    return ImageDataset(images, targets=targets)


def test_sampler_balances_batches() -> None:
    data = _imbalanced(90, 10)
    config = TrainConfig(epochs=1, batch_size=10, image_size=32, device="cpu")
    seen = []
    for balance, share in (("sampler", 0.5), ("none", 0.1), ("loss", 0.1)):
        t = _make_trainer(
            "classification", 2, data, TrainConfig(**{**config.__dict__, "class_balance": balance})
        )
        t.generator.manual_seed(0)
        torch.manual_seed(0)
        minority = [int((y == 1).sum()) for _ in range(20) for _, y, _ in t.loader]
        seen.append(sum(minority) / (20 * len(data)))
        assert seen[-1] == pytest.approx(share, abs=0.05), balance
        assert (t.class_weights is not None) == (balance == "loss")


def test_balanced_recipes_learn_the_minority_class() -> None:
    """A 15:1 toy set whose classes differ only by the blob's colour: in 2 epochs the plain loss
    leaves much of the minority class unlearnt; both balanced recipes find more of it."""
    rng = np.random.default_rng(4)
    n_major, n_minor, size = 150, 10, 16
    images = rng.normal(128, 20, (n_major + n_minor + 100, size, size, 3))
    targets = np.array([0] * n_major + [1] * n_minor + [0, 1] * 50)
    for i, c in enumerate(targets):
        images[i][_disc(size, rng)] = COLOURS[c] + rng.normal(0, 15, 3)
    images = np.clip(images, 0, 255).astype(np.uint8)
    train = ImageDataset(images[:160], targets=targets[:160])
    test = ImageDataset(images[160:], targets=targets[160:])
    recall = {}
    for balance in ("none", "loss", "sampler"):
        config = TrainConfig(epochs=2, batch_size=16, image_size=16, device="cpu",
                             augment="flip", class_balance=balance)  # fmt: skip
        model = train_model("classification", 2, train, config).model
        probs = score_pool(model, test, device="cpu").probs
        assert probs is not None
        recall[balance] = float((probs[test.targets == 1].argmax(1) == 1).mean())
    assert recall["loss"] > recall["none"] + 0.1, recall
    assert recall["sampler"] > recall["none"] + 0.1, recall


def test_derm_augment_moves_mask_with_image() -> None:
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((1, 32, 32), dtype=np.uint8)
    images[0, 4:14, 6:20] = 255  # a white rectangle off centre, its mask the same rectangle
    masks[0, 4:14, 6:20] = 1
    data = ImageDataset(images, masks=masks, augment="derm")
    torch.manual_seed(0)
    changed = 0
    for _ in range(30):
        image, mask, _ = data[0]
        assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        bright = image[0] > 0.5  # the rectangle's pixels (colour jitter keeps them bright)
        agree = (bright == (mask[0] == 1)).float().mean().item()
        assert agree > 0.9  # only the crop's resampled border pixels may differ
        changed += int(not torch.equal(mask[0], torch.from_numpy(masks[0]).float()))
    assert changed > 20


def test_derm_augment_is_seeded() -> None:
    aug = DermAugment(32)
    image = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(7)
    first = aug(image)[0]
    torch.manual_seed(7)
    assert torch.equal(first, aug(image)[0])
    assert first.dtype == torch.uint8


def test_dice_bce_per_sample() -> None:
    logits = torch.randn(3, 1, 8, 8)
    masks = (torch.rand(3, 1, 8, 8) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    expected = soft_dice_loss(logits, masks) + bce.flatten(1).mean(1)
    got = target_loss_per_sample("segmentation", logits, masks, "dice_bce")
    assert got.shape == (3,) and torch.allclose(got, expected)
    dice = target_loss_per_sample("segmentation", logits, masks, "dice")
    assert torch.allclose(dice, soft_dice_loss(logits, masks))
    with pytest.raises(ValueError, match="seg_loss"):
        target_loss_per_sample("segmentation", logits, masks, "focal")  # type: ignore[arg-type]


def _graded_blobs(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blob images whose colour fades towards the grey ground by a per-image amount: faint
    blobs are hard (high loss), vivid ones easy. Returns (images, classes, fade)."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % 3
    fade = rng.uniform(0.0, 1.0, n)
    images = rng.normal(128, 20, (n, size, size, 3))
    for i, c in enumerate(classes):
        colour = (1 - fade[i]) * COLOURS[c] + fade[i] * 128
        images[i][_disc(size, rng)] = colour + rng.normal(0, 15, 3)
    return np.clip(images, 0, 255).astype(np.uint8), classes.astype(np.int64), fade


def test_loss_prediction_head_learns() -> None:
    """On held-out images the module's predicted loss rank-correlates with the true loss; with
    the ranking term dropped from the training loss (loss_weight 0) it does not."""
    images, classes, _ = _graded_blobs(360, 16, seed=8)
    train = ImageDataset(images[:240], targets=classes[:240])
    held = ImageDataset(images[240:], targets=classes[240:])
    rho = {}
    for weight in (1.0, 0.0):
        config = TrainConfig(epochs=6, batch_size=16, image_size=16, device="cpu",
                             augment="flip", class_balance="none", loss_weight=weight,
                             stop_grad_fraction=0.6)  # fmt: skip
        model = train_model("classification", 3, train, config).model
        out = score_pool(model, held, device="cpu")
        assert out.probs is not None
        true_loss = -np.log(np.clip(out.probs[np.arange(len(held)), classes[240:]], 1e-12, 1))
        rho[weight] = float(spearmanr(out.predicted_loss, true_loss).statistic)
    assert rho[1.0] > 0.4, rho
    assert rho[1.0] > rho[0.0] + 0.2, rho
