"""Models, taps, the loss-prediction module and its losses; image loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet18

from ml.data import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, load_image, load_images, load_mask
from ml.models import (
    ActiveModel,
    LossPredictionModule,
    build_model,
    ranking_loss,
    soft_dice_loss,
    target_loss_per_sample,
)
from ml.train import detach_from_epoch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize(("task", "num_classes"), [("classification", 7), ("segmentation", 1)])
def test_output_shapes(task: str, num_classes: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(task, num_classes)  # type: ignore[arg-type]
    out = model(torch.randn(3, 3, size, size))
    expected = (3, 7) if task == "classification" else (3, 1, size, size)
    assert out.logits.shape == expected
    assert out.features.shape == (3, 512)
    assert out.predicted_loss.shape == (3,)
    assert torch.isfinite(out.predicted_loss).all()


def test_features_are_gap_of_last_block() -> None:
    torch.manual_seed(0)
    model = build_model("classification", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    captured: list[torch.Tensor] = []
    model.resnet.layer4.register_forward_hook(lambda m, i, o: captured.append(o))
    out = model(x)
    torch.testing.assert_close(out.features, captured[0].mean(dim=(2, 3)))


def test_bad_model_arguments() -> None:
    with pytest.raises(ValueError):
        build_model("segmentation", 2)
    with pytest.raises(ValueError):
        build_model("classification", 1)


def _lp_grads(
    model: ActiveModel, detach_taps: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Backpropagate the ranking loss alone; return the grads of a backbone conv and of the
    module's head."""
    model.zero_grad(set_to_none=True)
    x = torch.randn(4, 3, 32, 32)
    out = model(x, detach_taps=detach_taps)
    ranking_loss(out.predicted_loss, torch.tensor([3.0, 1.0, 2.0, 0.0])).backward()
    return cast(Any, model.resnet.layer1[0]).conv1.weight.grad, model.loss_module.head.weight.grad


@pytest.mark.parametrize(("task", "num_classes"), [("classification", 3), ("segmentation", 1)])
def test_detached_taps_stop_the_module_gradient(task: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(task, num_classes)  # type: ignore[arg-type]
    backbone_grad, head_grad = _lp_grads(model, detach_taps=False)
    assert backbone_grad is not None and backbone_grad.abs().sum() > 0
    assert head_grad is not None and head_grad.abs().sum() > 0
    backbone_grad, head_grad = _lp_grads(model, detach_taps=True)
    assert backbone_grad is None
    assert head_grad is not None and head_grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("epochs", "fraction", "first"),
    [(10, 0.6, 6), (5, 0.6, 3), (3, 0.6, 1), (100, 0.29, 29), (10, 1.0, 10), (10, 0.0, 0)],
)
def test_detach_schedule(epochs: int, fraction: float, first: int) -> None:
    assert detach_from_epoch(epochs, fraction) == first


def test_ranking_loss_hand_example() -> None:
    predicted = torch.tensor([3.0, 1.0, 2.0, 0.0], requires_grad=True)
    target = torch.tensor([1.0, 5.0, 0.0, 2.0])
    # pairs (0,3): l0 < l3 -> f=-1, lhat diff 3 -> max(0, 3 + 0.5) = 3.5
    #       (1,2): l1 > l2 -> f=+1, lhat diff -1 -> max(0, 1 + 0.5) = 1.5
    loss = ranking_loss(predicted, target, margin=0.5)
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    assert predicted.grad is not None
    torch.testing.assert_close(predicted.grad, torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_ranking_loss_matches_pairwise_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    for b in (2, 3, 7, 10):
        predicted, target = torch.randn(b, generator=gen), torch.randn(b, generator=gen)
        target[0] = target[-1]  # a tie: f = -1 ("otherwise")
        terms = []
        for i in range(b // 2):
            j = b - 1 - i
            f = 1.0 if target[i] > target[j] else -1.0
            terms.append(max(0.0, -f * float(predicted[i] - predicted[j]) + 1.0))
        assert ranking_loss(predicted, target, margin=1.0).item() == pytest.approx(np.mean(terms))


def test_ranking_loss_without_a_pair_is_zero_and_differentiable() -> None:
    predicted = torch.tensor([0.7], requires_grad=True)
    loss = ranking_loss(predicted, torch.tensor([1.0]))
    assert loss.item() == 0.0
    loss.backward()
    assert predicted.grad is not None


def test_soft_dice_per_sample() -> None:
    masks = torch.zeros(3, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    logits = torch.stack([masks[0] * 40 - 20, -(masks[1] * 40 - 20), torch.zeros(1, 8, 8)])
    loss = soft_dice_loss(logits, masks)
    assert loss.shape == (3,)
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)  # perfect
    assert loss[1].item() == pytest.approx(1 - 1 / (48 + 16 + 1), abs=1e-6)  # disjoint
    expected = 1 - (2 * 0.5 * 16 + 1) / (0.5 * 64 + 16 + 1)
    assert loss[2].item() == pytest.approx(expected)


def test_target_loss_per_sample_is_unreduced_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    loss = target_loss_per_sample("classification", logits, torch.tensor([0, 0]))
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0]), reduction="none")
    )


def test_loss_module_architecture() -> None:
    module = LossPredictionModule()
    assert [b.out_features for b in module.branches] == [128] * 4
    assert module.head.in_features == 512
    taps = [torch.randn(5, c, s, s) for c, s in [(64, 8), (128, 4), (256, 2), (512, 1)]]
    assert module(taps).shape == (5,)


def test_local_resnet_weights_load(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = resnet18(weights=None)  # 1000 classes: fc is skipped
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    for task, num_classes in [("classification", 3), ("segmentation", 1)]:
        model = build_model(task, num_classes, weights_path=path)  # type: ignore[arg-type]
        torch.testing.assert_close(
            cast(Any, model.resnet.layer4[1]).conv2.weight,
            cast(Any, reference.layer4[1]).conv2.weight,
        )
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a ResNet-18"):
        build_model("classification", 3, weights_path=tmp_path / "bad.pth")


def test_load_image_and_masks(tmp_path: Path) -> None:
    rgb = np.zeros((30, 40, 3), dtype=np.uint8)
    rgb[:, :20] = [255, 0, 0]
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[:, :, 0]).convert("L").save(tmp_path / "grey.png")
    image = load_image(tmp_path / "a.png", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == (255, 0, 0) and tuple(image[0, 15]) == (0, 0, 0)
    assert load_images([tmp_path / "a.png", tmp_path / "grey.png"], 16).shape == (2, 16, 16, 3)
    mask = (rgb[:, :, 0] > 0).astype(np.uint8)
    Image.fromarray(mask * 255).save(tmp_path / "m255.png")
    Image.fromarray(mask).save(tmp_path / "m01.png")
    for name in ("m255.png", "m01.png"):
        loaded = load_mask(tmp_path / name, 16)
        assert loaded.dtype == np.uint8 and set(np.unique(loaded)) == {0, 1}
        assert loaded[:, :8].all() and not loaded[:, 8:].any()


def test_dataset_items_and_flip() -> None:
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[:, :, 0] = 255
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[:, :, 0] = 1
    image, target, index = ImageDataset(images, masks=masks)[1]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and index == 1
    assert target.shape == (1, 4, 4) and target.dtype == torch.float32
    red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert image[0, 0, 0].item() == pytest.approx(red, rel=1e-5)
    augmented = ImageDataset(images, masks=masks, augment="flip")
    torch.manual_seed(0)
    flips = 0
    for _ in range(20):
        image, target, _ = augmented[0]
        assert (image[0, :, 0] > 0).all() == (target[0, :, 0] == 1).all()  # image and mask agree
        flips += int(target[0, 0, 3].item() == 1)
    assert 0 < flips < 20
    _, label, _ = ImageDataset(images, targets=np.array([2, 1]))[0]
    assert label.dtype == torch.int64 and label.item() == 2
    assert ImageDataset(images)[0][1].item() == -1
