"""Batches made on the training device (the GPU's path), run here on the CPU: the same samples,
the same targets, augmentations that keep masks on their lesions, and seeded training."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ml.augment import random_affine, warp
from ml.data import DeviceBatches, ImageDataset, device_batches
from ml.infer import score_pool
from ml.train import TrainConfig, evaluate, resolve_loader, train_model

from .conftest import blob_images, disc_images

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _batches(data: ImageDataset, seed: int = 0, **kw: Any) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    kw.setdefault("batch_size", 8)
    return list(DeviceBatches(data, device=CPU, generator=g, **kw))


def _items(data: ImageDataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[int(i)] for i in idx]
    return torch.stack([x for x, _, _ in items]), torch.stack([t for _, t, _ in items])


def test_device_batches_equal_the_datasets_items() -> None:
    images, classes = blob_images(21, 16, seed=1)
    data = ImageDataset(images, targets=classes)
    got = torch.cat(list(device_batches(data, 8, CPU)))
    want, _ = _items(data, torch.arange(21))
    assert torch.equal(got, want)  # bit for bit: scores on the CPU are unchanged
    with pytest.raises(ValueError, match="batch_size"):
        next(device_batches(data, 0, CPU))


def test_an_epoch_without_augmentation_is_a_permutation_of_the_items() -> None:
    images, classes = blob_images(21, 16, seed=2)
    data = ImageDataset(images, targets=classes)
    batches = _batches(data)
    assert [len(b[2]) for b in batches] == [8, 8, 5]
    order = torch.cat([b[2] for b in batches])
    assert sorted(order.tolist()) == list(range(21)) and order.tolist() != list(range(21))
    for x, y, idx in batches:
        want_x, want_y = _items(data, idx)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert len(DeviceBatches(data, batch_size=10, device=CPU, generator=torch.Generator())) == 3
    # a last batch of one is dropped only when asked (BatchNorm cannot train on it)
    kept = DeviceBatches(data, batch_size=10, device=CPU, generator=torch.Generator())
    dropped = DeviceBatches(
        data, batch_size=10, device=CPU, generator=torch.Generator(), drop_single=True
    )
    assert [len(b[2]) for b in kept] == [10, 10, 1]
    assert len(dropped) == 2 and [len(b[2]) for b in dropped] == [10, 10]


def test_seeded_epochs_repeat_and_seeds_differ() -> None:
    images, masks = disc_images(12, 16, seed=3)
    data = ImageDataset(images, masks=masks, augment="derm")
    first, again, other = _batches(data, 5), _batches(data, 5), _batches(data, 6)
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(first[0][0], other[0][0])


def test_weights_draw_with_replacement_towards_the_rare_class() -> None:
    images, _ = blob_images(100, 8, seed=4)
    classes = np.array([0] * 90 + [1] * 10)
    data = ImageDataset(images, targets=classes)
    weights = torch.tensor([1 / 90] * 90 + [1 / 10] * 10, dtype=torch.float64)
    drawn = torch.cat([b[1] for b in _batches(data, weights=weights, batch_size=50)])
    assert len(drawn) == 100 and 30 <= int(drawn.sum()) <= 70  # ~50 rare draws, not 10


def test_flip_policy_mirrors_some_images_and_leaves_the_rest() -> None:
    images, masks = disc_images(40, 16, seed=5)
    data = ImageDataset(images, masks=masks, augment="flip")
    plain = ImageDataset(images, masks=masks)
    flipped = 0
    for x, mask, idx in _batches(data, batch_size=40):
        want_x, want_mask = _items(plain, idx)
        for i in range(len(idx)):
            same = torch.equal(x[i], want_x[i]) and torch.equal(mask[i], want_mask[i])
            mirrored = torch.equal(x[i], want_x[i].flip(-1)) and torch.equal(
                mask[i], want_mask[i].flip(-1)
            )
            assert same or mirrored
            flipped += int(mirrored and not same)
    assert 8 <= flipped <= 32


def test_whole_image_affine_is_one_of_the_eight_symmetries() -> None:
    x = torch.rand(64, 3, 9, 9)
    theta = random_affine(64, torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0))
    out, _ = warp(x, theta, 9)
    seen = set()
    for i in range(64):
        symmetries = [
            torch.rot90(img, k, dims=(-2, -1)) for img in (x[i], x[i].flip(-1)) for k in range(4)
        ]
        match = [j for j, s in enumerate(symmetries) if torch.allclose(out[i], s, atol=1e-5)]
        assert match, i  # exact pixels: no interpolation for the flips and rotations
        seen.add(match[0])
    assert len(seen) == 8


def _crop_sizes(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, h) of each crop, relative to the image: the rows of diag(w, h) @ a signed
    permutation."""
    return theta[:, 0, :2].abs().sum(1), theta[:, 1, :2].abs().sum(1)


def test_derm_crops_fit_the_image_and_keep_their_area_and_aspect() -> None:
    g = torch.Generator().manual_seed(1)
    w, h = _crop_sizes(random_affine(20000, g, (0.5, 1.0), (3 / 4, 4 / 3), tries=10))
    eps = 1e-5
    assert (w <= 1 + eps).all() and (h <= 1 + eps).all()
    assert ((w * h >= 0.5 - eps) & (w * h <= 1 + eps)).all()
    assert ((w / h >= 3 / 4 - eps) & (w / h <= 4 / 3 + eps)).all()
    assert 0.65 < float((w * h).mean()) < 0.73  # torchvision's RandomResizedCrop: ~0.70
    full_side = (w >= 1 - eps) | (h >= 1 - eps)
    assert float(full_side.float().mean()) < 0.02  # the whole image when 10 draws do not fit
    # SimCLR's views clamp instead: a quarter of the crops then span the image's side
    w, h = _crop_sizes(random_affine(20000, g, (0.5, 1.0), (3 / 4, 4 / 3)))
    assert float(((w >= 1 - eps) | (h >= 1 - eps)).float().mean()) > 0.15


def test_derm_batches_keep_masks_on_their_lesions() -> None:
    images, masks = disc_images(32, 32, seed=6)
    data = ImageDataset(images, masks=masks, augment="derm")
    plain = ImageDataset(images, masks=masks)
    changed = 0
    for x, mask, idx in _batches(data, batch_size=16):
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
        assert mask.shape == (16, 1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        brightness = x.mean(1, keepdim=True)
        for i in range(len(idx)):
            lesion, skin = mask[i] > 0.5, mask[i] < 0.5
            assert lesion.any() and skin.any()
            # the lesion is dark: after crop, flips, rotation and jitter it is still under the mask
            assert brightness[i][lesion].mean() < brightness[i][skin].mean() - 1.0
            dark = brightness[i] < (brightness[i][lesion].mean() + brightness[i][skin].mean()) / 2
            assert (dark == lesion).float().mean() > 0.9
        changed += int((mask != _items(plain, idx)[1]).any())
    assert changed > 0


def test_device_loader_trains_scores_and_repeats_on_the_cpu() -> None:
    images, classes = blob_images(120, 32, seed=7)
    train_set = ImageDataset(images[:90], targets=classes[:90])
    test_set = ImageDataset(images[90:], targets=classes[90:])
    config = TrainConfig(epochs=3, batch_size=16, image_size=32, device="cpu", loader="device")
    first = train_model("classification", 3, train_set, config)
    again = train_model("classification", 3, train_set, config)
    assert first.loader == "device"
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    assert first.history[-1]["target_loss"] < first.history[0]["target_loss"]
    assert evaluate(first.model, test_set, device="cpu")["accuracy"] > 0.6  # chance is 1/3
    assert score_pool(first.model, test_set, device="cpu").features.shape == (30, 512)
    # resumed from epoch 1, the run ends where the uninterrupted one ends
    states: list[dict[str, Any]] = []
    train_model("classification", 3, train_set, config, checkpoint_every=states.append)
    resumed = train_model("classification", 3, train_set, config, resume=states[0])
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # a checkpoint made by one loader resumes under the other (where, not what)
    other = TrainConfig(**{**config.__dict__, "loader": "dataloader"})
    elsewhere = train_model("classification", 3, train_set, other, resume=states[0])
    assert len(elsewhere.history) == 3
    assert elsewhere.history[0]["loss"] == first.history[0]["loss"]  # the checkpoint's epoch


def test_a_gpu_checkpoints_channels_last_moments_resume_on_the_cpu() -> None:
    """A GPU run's model is channels-last, so are its optimizer's moments in the checkpoint; a
    CPU resumption lays them out like its own parameters and ends where the CPU run ends."""
    images, classes = blob_images(40, 16, seed=11)
    data = ImageDataset(images, targets=classes)
    config = TrainConfig(epochs=2, batch_size=8, image_size=16, device="cpu", loader="device")
    states: list[dict[str, Any]] = []
    straight = train_model("classification", 3, data, config, checkpoint_every=states.append)
    saved = states[0]
    moments = saved["optimizer"]["state"].values()
    four_d = [v for m in moments for v in m.values() if isinstance(v, torch.Tensor) and v.ndim == 4]
    assert four_d
    for m in moments:
        for k, v in m.items():
            if isinstance(v, torch.Tensor) and v.ndim == 4:
                m[k] = v.contiguous(memory_format=torch.channels_last)
    resumed = train_model("classification", 3, data, config, resume=saved)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_device_loader_trains_segmentation() -> None:
    images, masks = disc_images(48, 32, seed=8)
    data = ImageDataset(images, masks=masks)
    config = TrainConfig(epochs=2, batch_size=16, image_size=32, device="cpu", loader="device")
    result = train_model("segmentation", 1, data, config)
    assert result.history[-1]["target_loss"] < result.history[0]["target_loss"]
    assert 0.0 <= evaluate(result.model, data, device="cpu")["dice"] <= 1.0


def test_loader_choice() -> None:
    assert resolve_loader("auto", torch.device("cpu")) == "dataloader"
    assert resolve_loader("auto", torch.device("cuda")) == "device"
    assert resolve_loader("device", torch.device("cpu")) == "device"
    gpu = torch.device("cuda")
    assert resolve_loader("auto", gpu, set_bytes=2 * 2**30, free_bytes=8 * 2**30) == "device"
    # a set that would crowd the GPU stays in host memory
    assert resolve_loader("auto", gpu, set_bytes=3 * 2**30, free_bytes=8 * 2**30) == "dataloader"
    assert resolve_loader("device", gpu, set_bytes=3 * 2**30, free_bytes=8 * 2**30) == "device"
    images, classes = blob_images(8, 16, seed=9)
    bad = TrainConfig(epochs=1, batch_size=4, image_size=16, device="cpu", loader="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loader"):
        train_model("classification", 3, ImageDataset(images, targets=classes), bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_the_cpus() -> None:
    images, masks = disc_images(24, 32, seed=10)
    for augment in ("none", "flip", "derm"):
        data = ImageDataset(images, masks=masks, augment=augment)
        on_cpu = _batches(data, 3)
        g = torch.Generator().manual_seed(3)
        cuda = torch.device("cuda")
        batches = DeviceBatches(data, batch_size=8, device=cuda, generator=g)
        epoch = iter(batches)
        on_gpu = [next(epoch)]  # the epoch's draws are copied to the GPU with its first batch
        torch.cuda.set_sync_debug_mode("error")  # after that nothing waits for the GPU
        try:
            on_gpu.extend(epoch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for (x, m, i), (gx, gm, gi) in zip(on_cpu, on_gpu, strict=True):
            assert gx.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(i, gi.cpu()) and (m != gm.cpu()).float().mean() < 0.01
            torch.testing.assert_close(gx.cpu(), x, atol=1e-3, rtol=0)


def test_optimizer_moments_take_their_parameters_layout() -> None:
    from ml.train import _match_layouts

    weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    state = optimizer.state[weight]
    state["exp_avg"] = state["exp_avg"].contiguous(memory_format=torch.channels_last)
    before = state["exp_avg"].clone()
    _match_layouts(optimizer)
    after = optimizer.state[weight]["exp_avg"]
    assert after.is_contiguous() and after.stride() == weight.stride()
    assert torch.equal(after, before)
