"""Self-supervised warm start (SimCLR): views, determinism, resumption, cancellation, and the
backbone's state_dict plugging into the classifier and the U-Net encoder (CPU, tiny)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.data import IMAGENET_MEAN, IMAGENET_STD
from ml.models import build_model, load_resnet_weights
from ml.pretrain import (
    PretrainCancelled,
    PretrainConfig,
    default_epochs,
    embed_images,
    make_views,
    pretrain_backbone,
    pretrain_cached,
)
from ml.train import TrainingCancelled

from .conftest import blob_images

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = PretrainConfig(
    epochs=3,
    batch_size=8,
    image_size=32,
    device="cpu",
    projection_hidden_dim=64,
    projection_dim=32,
)


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    images, _ = blob_images(20, 32, seed=7)
    return images


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_runs_and_gives_a_resnet18_state_dict(pool: np.ndarray) -> None:
    seen: list[tuple[int, int]] = []
    result = pretrain_backbone(pool, TINY, on_epoch=lambda e, n, m: seen.append((e, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]
    for h in result.history:
        assert np.isfinite(h["loss"]) and h["images_per_second"] > 0
    assert result.history[-1]["lr"] == pytest.approx(0.0)
    expected = {k for k in resnet18().state_dict() if not k.startswith("fc.")}
    assert set(result.state_dict) == expected
    assert all(v.device.type == "cpu" for v in result.state_dict.values())
    assert result.checkpoint["epoch"] == 3


def test_state_dict_loads_into_classifier_and_unet_encoder(
    pool: np.ndarray, tmp_path: Path
) -> None:
    result = pretrain_backbone(pool, replace(TINY, epochs=1))
    path = tmp_path / "warm-start.pt"
    save_checkpoint(path, result.state_dict)
    for task, classes in (("classification", 7), ("segmentation", 1)):
        model = build_model(task, classes, weights_path=path)  # type: ignore[arg-type]
        own = model.resnet.state_dict()
        for key, value in result.state_dict.items():
            assert torch.equal(own[key], value), (task, key)
    net = resnet18(num_classes=7)
    load_resnet_weights(net, path)
    assert torch.equal(net.conv1.weight, result.state_dict["conv1.weight"])


def test_loss_decreases_on_a_structured_set() -> None:
    images, _ = blob_images(48, 32, seed=3)
    config = replace(TINY, epochs=8, batch_size=16, lr=3e-3, warmup_fraction=0.0)
    losses = [h["loss"] for h in pretrain_backbone(images, config).history]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses


def test_same_seed_same_weights_other_seed_differs(pool: np.ndarray) -> None:
    config = replace(TINY, epochs=1)
    first = pretrain_backbone(pool, config)
    second = pretrain_backbone(pool, config)
    _same(first.state_dict, second.state_dict)
    other = pretrain_backbone(pool, replace(config, seed=1))
    assert not torch.equal(other.state_dict["conv1.weight"], first.state_dict["conv1.weight"])


def test_global_rng_left_alone(pool: np.ndarray) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain_backbone(pool, replace(TINY, epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_resume_equals_uninterrupted(pool: np.ndarray, tmp_path: Path) -> None:
    states: list[dict[str, Any]] = []
    straight = pretrain_backbone(pool, TINY, checkpoint_every=states.append)
    assert [s["epoch"] for s in states] == [1, 2, 3]
    path = tmp_path / "resume.pt"
    save_checkpoint(path, states[0])  # through a file, loaded with weights_only
    resumed = pretrain_backbone(pool, TINY, resume=load_checkpoint(path))
    _same(straight.state_dict, resumed.state_dict)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    done = pretrain_backbone(pool, TINY, resume=states[-1])  # nothing left to do
    _same(straight.state_dict, done.state_dict)


def test_resume_refuses_other_settings(pool: np.ndarray) -> None:
    states: list[dict[str, Any]] = []
    pretrain_backbone(pool, replace(TINY, epochs=1), checkpoint_every=states.append)
    with pytest.raises(ValueError, match="temperature"):
        pretrain_backbone(pool, replace(TINY, epochs=1, temperature=0.5), resume=states[0])
    with pytest.raises(ValueError, match="not a pretraining checkpoint"):
        pretrain_backbone(pool, TINY, resume={"format": "coreloop.ml.checkpoint/1"})


def test_cancel_raises_between_batches(pool: np.ndarray) -> None:
    calls = itertools.count()
    states: list[dict[str, Any]] = []
    with pytest.raises(PretrainCancelled, match="epoch 2") as caught:
        pretrain_backbone(
            pool,
            TINY,
            should_stop=lambda: next(calls) >= 3,  # 2 batches per epoch: stops in epoch 2
            checkpoint_every=states.append,
        )
    assert isinstance(caught.value, TrainingCancelled)
    assert [s["epoch"] for s in states] == [1]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pretrain_backbone(np.zeros((4, 32, 32, 3), np.float32), TINY)
    with pytest.raises(ValueError, match="at least 2"):
        pretrain_backbone(np.zeros((1, 32, 32, 3), np.uint8), TINY)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def test_geometric_views_are_exact_flips_and_rotations(pool: np.ndarray) -> None:
    config = replace(TINY, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_p=0.0)
    batch = torch.from_numpy(pool[:16])
    views = make_views(batch, config, torch.Generator().manual_seed(0))
    reference = _normalise(batch)
    dihedral = [
        lambda x, k=k, f=f: torch.rot90(x.flip(-1) if f else x, k, dims=(-2, -1))
        for k in range(4)
        for f in (False, True)
    ]
    used = set()
    for i in range(len(batch)):
        matches = [
            j
            for j, op in enumerate(dihedral)
            if torch.allclose(views[i], op(reference[i]), atol=1e-4)
        ]
        assert matches, f"view {i} is not a flip/rotation of its image"
        used.add(matches[0])
    assert len(used) > 2  # the transforms vary per sample


def test_views_vary_per_sample_and_repeat_per_seed() -> None:
    same = torch.from_numpy(np.repeat(blob_images(1, 32, seed=1)[0], 8, axis=0))
    config = replace(TINY, image_size=24)
    first = make_views(same, config, torch.Generator().manual_seed(5))
    again = make_views(same, config, torch.Generator().manual_seed(5))
    assert first.shape == (8, 3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, again)
    for i in range(1, 8):
        assert not torch.allclose(first[0], first[i])


def test_colour_jitter_keeps_range_and_changes_colour(pool: np.ndarray) -> None:
    geometric = replace(TINY, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_p=0.0)
    coloured = replace(geometric, color_p=1.0, hue=0.1)
    batch = torch.from_numpy(pool[:8])
    plain = make_views(batch, geometric, torch.Generator().manual_seed(1))
    jittered = make_views(batch, coloured, torch.Generator().manual_seed(1))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = jittered * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert (plain - jittered).abs().mean() > 0.05


def test_default_epochs_budget() -> None:
    cpu = default_epochs("cpu", 8000, 64)
    assert 1 <= cpu <= 20
    assert default_epochs("cpu", 800, 64) > cpu
    assert default_epochs("cpu", 8000, 128) <= cpu
    assert default_epochs("cpu", 10, 64) == 200


def test_embed_images(pool: np.ndarray) -> None:
    result = pretrain_backbone(pool, replace(TINY, epochs=1))
    features = embed_images(pool[:5], result.state_dict, batch_size=2, device="cpu")
    assert features.shape == (5, 512) and features.dtype == np.float32
    assert np.isfinite(features).all()
    assert not np.allclose(features, embed_images(pool[:5], None, device="cpu"))


def test_pretrain_cached_runs_once_per_pool_and_settings(
    pool: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(TINY, epochs=1)
    first = pretrain_cached(pool, config, tmp_path)
    assert first.is_file()
    build_model("classification", 3, weights_path=first)
    runs: list[int] = []

    def counted(images: np.ndarray, cfg: PretrainConfig, **kwargs: Any) -> Any:
        runs.append(1)
        return pretrain_backbone(images, cfg, **kwargs)

    monkeypatch.setattr("ml.pretrain.pretrain_backbone", counted)
    assert pretrain_cached(pool, replace(config, device="cpu", amp=False), tmp_path) == first
    assert runs == []
    assert pretrain_cached(pool[:10], config, tmp_path) != first
    assert pretrain_cached(pool, replace(config, seed=1), tmp_path) != first
    assert runs == [1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_views_on_the_gpu_match_the_cpus_and_wait_for_nothing() -> None:
    batch = torch.randint(0, 256, (16, 40, 40, 3), dtype=torch.uint8)
    config = PretrainConfig(image_size=32)
    on_cpu = make_views(batch, config, torch.Generator().manual_seed(2))
    on_gpu = batch.cuda()
    make_views(on_gpu, config, torch.Generator())  # the first call copies the constants
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = make_views(on_gpu, config, torch.Generator().manual_seed(2))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(views.cpu(), on_cpu, atol=1e-3, rtol=0)
