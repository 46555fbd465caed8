"""Joint training of the target model and the loss-prediction module, and evaluation.

The joint loss is the paper's eq. 3: ``mean(L_target) + lambda * L_up``
(:func:`ml.models.ranking_loss`), lambda = ``loss_weight`` = 1, margin xi = 0.5. As in Yoo &
Kweon's code, the module's gradient into the backbone is stopped (tapped maps detached) once
``stop_grad_fraction`` of the epochs have run (Yoo: epoch 120 of 200).

Optimizer (a deliberate difference: the paper does not state its optimizer; Yoo trained CIFAR-10
with SGD lr 0.1, momentum 0.9, wd 5e-4 for 200 epochs, lr / 10 at 160): AdamW, lr 1e-3, weight
decay 1e-2 (decoupled), cosine decay to 0 per step, no warm-up, one optimizer for backbone and
module (Yoo used two SGD optimizers with equal settings, the same thing for SGD). A round here
trains a ResNet-18 from scratch for ~10-30 epochs on a few hundred to a few thousand labeled
images; SGD at lr 0.1 from scratch needs a long schedule and warm-up to be stable, Adam at 1e-3
converges in few epochs across very different labeled-set sizes without retuning per round.
Checked on real data (HAM10000, 1,200 training / 600 test images split by lesion, 32 px,
8 epochs, batch 32, same cosine schedule, seeds 0 and 1): balanced accuracy AdamW 1e-3
0.265 / 0.278, SGD 0.01 0.255 / 0.243, SGD 0.1 0.232 / 0.143; AdamW also reached the lowest
training loss. The same recipe trains every strategy and the random baseline.

Other differences from the paper (Kim et al. 2020, section 3.2): images are smaller than 224 px
on the CPU (``image_size``); stopping the module's gradient after 60% of the epochs is Yoo's,
not stated in the paper; a last batch of exactly one sample is dropped each epoch (BatchNorm
cannot train on it); the per-sample Dice loss is the smoothed soft Dice (smooth = 1).

On a GPU (``loader="auto"``): the labeled set is copied to the device once as uint8 (when it
takes at most a quarter of the free GPU memory; else the per-sample loader feeds it) and each
batch is gathered, augmented and normalised there (:class:`ml.data.DeviceBatches`); the model
and its inputs are channels-last, and cuDNN picks its kernels for the fixed input size (unless
deterministic algorithms are on). On the CPU the per-sample ``DataLoader`` stays the default:
there the batched path is about as fast (x1.05-1.06 at 64 px, x0.95-0.99 at 224 px, two runs
of ``python -m benchmarks.gpu_round --device cpu --skip-select-bench --skip-rounds --sizes
64,224 --throughput-pool 256 --throughput-epochs 2 --out DIR``), and the seeded CPU results
were measured with the per-sample loader.

Determinism: the model is initialised under ``seed`` and torch's global generator plus the
loader's generator are re-seeded at the start of every epoch from ``(seed, epoch)``. So on the
CPU the same seed gives bit-identical weights, and a run resumed from an epoch-k checkpoint
ends where the uninterrupted run ends.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler
from torchmetrics.classification import BinaryJaccardIndex, MulticlassAccuracy

from ml.augment import AugmentPolicy
from ml.data import DeviceBatches, ImageDataset, Task, device_batches, model_layout
from ml.models import (
    ActiveModel,
    SegLoss,
    build_model,
    ranking_loss,
    target_loss_per_sample,
)

ClassBalance = Literal["none", "loss", "sampler"]
CLASS_BALANCES: tuple[ClassBalance, ...] = ("none", "loss", "sampler")
Loader = Literal["auto", "dataloader", "device"]
LOADERS: tuple[Loader, ...] = ("auto", "dataloader", "device")

CHECKPOINT_FORMAT = "coreloop.ml.checkpoint/1"
# Config fields that may change between a checkpoint and its resumption: where and how fast the
# same recipe runs (the random draws may differ, and on a GPU the arithmetic's order).
_RESUMABLE_CHANGES = frozenset({"device", "amp", "num_workers", "loader"})


class TrainingCancelled(Exception):
    """``should_stop()`` returned True; raised between batches (nothing half-updated)."""


@dataclass
class TrainConfig:
    """Training settings. ``image_size`` must equal the data sets' image size (load them at it);
    ``weights_path`` optionally loads a local ResNet-18 state_dict before training."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    image_size: int = 64
    augment: AugmentPolicy = "derm"
    class_balance: ClassBalance = "sampler"
    balance_power: float = 1.0
    seg_loss: SegLoss = "dice_bce"
    seed: int = 0
    device: str = "auto"
    margin: float = 0.5
    loss_weight: float = 1.0
    stop_grad_fraction: float = 0.6
    amp: bool = True
    num_workers: int = 0
    weights_path: str | None = None
    # Where batches are made: "dataloader" (per sample on the CPU, ``num_workers`` processes),
    # "device" (the set held on the training device, batches augmented there:
    # :class:`ml.data.DeviceBatches`), or "auto": "device" on a GPU when the set takes at most
    # :data:`DEVICE_SET_SHARE` of its free memory, else "dataloader" (always on the CPU).
    loader: Loader = "auto"


@dataclass
class TrainResult:
    """The trained model (in eval mode), one metrics dict per epoch, the final resumable
    checkpoint state (the one also passed to ``checkpoint_every`` last), and the loader that
    made the batches (``"dataloader"`` or ``"device"``)."""

    model: ActiveModel
    history: list[dict[str, float]]
    checkpoint: dict[str, Any] = field(default_factory=dict)
    loader: Loader = "dataloader"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# The share of a GPU's free memory the labeled set may take on it ("auto" loader); beyond it
# the set stays in host memory and the per-sample loader feeds the GPU.
DEVICE_SET_SHARE = 0.25


def gpu_free_bytes(device: torch.device) -> int:
    """Memory this process could still use on a GPU: the driver's free memory plus what
    PyTorch holds cached but unused (so the choice does not depend on what ran before)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def resolve_loader(
    loader: Loader, device: torch.device, set_bytes: int = 0, free_bytes: int | None = None
) -> Loader:
    """``"auto"`` -> ``"device"`` on a GPU when the set (``set_bytes``, uint8) takes at most
    :data:`DEVICE_SET_SHARE` of the device's ``free_bytes`` (unknown: it fits), else
    ``"dataloader"``, as on the CPU (where the per-sample path's seeded results were measured);
    anything else as given."""
    if loader != "auto":
        return loader
    if device.type != "cuda":
        return "dataloader"
    fits = free_bytes is None or set_bytes <= DEVICE_SET_SHARE * free_bytes
    return "device" if fits else "dataloader"


def place_model(model: ActiveModel, device: torch.device) -> ActiveModel:
    """``model`` moved to ``device`` (in place), channels-last on a GPU: tensor cores run
    convolutions fastest in that layout (:func:`ml.data.model_layout` lays out the inputs).
    Outside inference mode, so that a model placed for scoring can still be trained."""
    with torch.inference_mode(False):
        model.to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
    return model


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; None (fp32) on the CPU."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def detach_from_epoch(epochs: int, fraction: float) -> int:
    """First 0-based epoch whose taps are detached: ``floor(fraction * epochs)`` (10 epochs at
    0.6 -> epochs 0-5 train the backbone through the module, 6-9 do not)."""
    return math.floor(round(fraction * epochs, 9))


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for one epoch of one run."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint64)[0] >> 1)


def _cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU (a snapshot later training cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class _Trainer:
    """The mutable pieces of one training run."""

    model: ActiveModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor, int]] | DeviceBatches
    generator: torch.Generator
    device: torch.device
    dtype: torch.dtype | None
    class_weights: torch.Tensor | None = None

    def state(self, epoch: int, config: TrainConfig, history: list[dict[str, float]]) -> dict:
        """A resumable checkpoint after ``epoch`` completed epochs (tensors copied to the CPU)."""
        legacy = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
        name, keys, pos, has_gauss, cached = legacy
        rng: dict[str, Any] = {  # tensors and plain values only: loadable with weights_only
            "torch": torch.get_rng_state(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "python": random.getstate(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return _cpu_copy(
            {
                "format": CHECKPOINT_FORMAT,
                "task": self.model.task,
                "num_classes": self.model.num_classes,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "config": asdict(config),
                "history": history,
                "rng": rng,
            }
        )

    def restore(self, state: dict, task: Task, num_classes: int, config: TrainConfig) -> int:
        """Load a checkpoint from :meth:`state`; returns the number of epochs already done."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a training checkpoint (format {state.get('format')!r})")
        if (state["task"], state["num_classes"]) != (task, num_classes):
            raise ValueError("checkpoint is for another task or number of classes")
        check_resumable(state["config"], asdict(config), _RESUMABLE_CHANGES)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        _match_layouts(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return int(state["epoch"])


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Lay every optimizer state tensor out like its parameter (a GPU checkpoint's moments are
    channels-last, a CPU model's parameters are not: the multi-tensor kernels want one layout)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    optimizer.state[param][key] = torch.empty_like(param).copy_(value)


def check_resumable(saved: dict[str, Any], now: dict[str, Any], may_change: frozenset[str]) -> None:
    """Refuse to resume a checkpoint made with other settings than ``now`` (those in
    ``may_change`` aside: they change where and how fast, not what is computed)."""
    changed = {k for k in now if k not in may_change and saved.get(k) != now[k]}
    if changed:
        raise ValueError(f"cannot resume with different settings: {sorted(changed)}")


def _make_trainer(
    task: Task, num_classes: int, train_set: ImageDataset, config: TrainConfig
) -> _Trainer:
    if len(train_set) < 2:
        raise ValueError("training needs at least 2 labeled images")
    train_set.check_labels(task, num_classes)
    if train_set.image_size != (config.image_size, config.image_size):
        raise ValueError(
            f"images are {train_set.image_size}, config.image_size is {config.image_size}"
        )
    if config.class_balance not in CLASS_BALANCES:
        raise ValueError(f"class_balance must be one of {CLASS_BALANCES}")
    if config.loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = place_model(build_model(task, num_classes, config.weights_path), device)
    if device.type == "cuda":  # fixed input sizes: let cuDNN pick its kernels, unless a run
        # must repeat (autotuning may pick another algorithm next time)
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    batch_size = min(config.batch_size, len(train_set))
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one sample.
    drop_last = len(train_set) % batch_size == 1
    generator = torch.Generator()
    balance = config.class_balance if task == "classification" else "none"
    weights = None
    per_sample: torch.Tensor | None = None
    if balance != "none" and train_set.targets is not None:
        weights = class_weights(train_set.targets, num_classes, config.balance_power)
        if balance == "sampler":
            per_sample = weights[torch.from_numpy(train_set.targets)].double()
            weights = None
    augmented = train_set.with_augment(config.augment)
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor, int]] | DeviceBatches
    set_bytes = train_set.images.nbytes + (0 if train_set.masks is None else train_set.masks.nbytes)
    free = gpu_free_bytes(device) if device.type == "cuda" else None
    if resolve_loader(config.loader, device, set_bytes, free) == "device":
        loader = DeviceBatches(
            augmented,
            batch_size=batch_size,
            device=device,
            generator=generator,
            weights=per_sample,
            drop_single=drop_last,
        )
    else:
        sampler = None
        if per_sample is not None:
            sampler = WeightedRandomSampler(
                per_sample.tolist(), len(train_set), replacement=True, generator=generator
            )
        loader = DataLoader(
            augmented,
            batch_size=batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=config.num_workers,
            generator=generator,
            pin_memory=device.type == "cuda",
        )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    total_steps = max(1, config.epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)),
    )
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return _Trainer(
        model,
        optimizer,
        scheduler,
        scaler,
        loader,
        generator,
        device,
        dtype,
        None if weights is None else weights.to(device),
    )


def recipe(task: Task, config: TrainConfig) -> dict[str, Any]:
    """The training recipe as recorded with a model version: what handled the imbalance, the
    augmentation, the loss, the schedule, and whether a warm start was loaded."""
    return {
        "augment": config.augment,
        "class_balance": config.class_balance if task == "classification" else "none",
        "balance_power": config.balance_power,
        "loss": "cross_entropy" if task == "classification" else config.seg_loss,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "schedule": "adamw+cosine",
        "image_size": config.image_size,
        "warm_start": config.weights_path is not None,
    }


def class_weights(targets: np.ndarray, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency class weights ``N / (K * n_c)`` over the K classes present (0 for an
    absent class): a class-weighted loss or sampler then gives each present class the same
    total weight, and the mean weight per sample is 1. ``power`` < 1 rebalances part of the
    way: weights ``proportional to n_c ** -power``, scaled so the mean weight per sample is 1
    (0.5: each class's share goes as the square root of its count)."""
    counts = torch.bincount(torch.from_numpy(np.asarray(targets, dtype=np.int64)),
                            minlength=num_classes).float()  # fmt: skip
    present = counts > 0
    weights = torch.zeros(num_classes)
    weights[present] = counts[present] ** -power
    weights *= counts.sum() / (weights * counts).sum()
    return weights


def _train_one_epoch(
    t: _Trainer, config: TrainConfig, epoch: int, should_stop: Callable[[], bool] | None
) -> dict[str, float]:
    """One pass over the loader; returns the sample-weighted mean losses."""
    detach = epoch >= detach_from_epoch(config.epochs, config.stop_grad_fraction)
    t.model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=t.device)
    seen = 0
    for images, targets, _ in t.loader:
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"cancelled during epoch {epoch + 1}")
        images = model_layout(images.to(t.device, non_blocking=True))
        targets = targets.to(t.device, non_blocking=True)
        with torch.autocast(t.device.type, dtype=t.dtype, enabled=t.dtype is not None):
            out = t.model(images, detach_taps=detach)
        per_sample = target_loss_per_sample(t.model.task, out.logits, targets, config.seg_loss)
        lp_loss = ranking_loss(out.predicted_loss.float(), per_sample, config.margin)
        if t.class_weights is None:
            target_loss = per_sample.mean()
        else:  # class-weighted mean; the module still learns the unweighted per-sample loss
            w = t.class_weights[targets]
            target_loss = (w * per_sample).sum() / w.sum().clamp(min=1e-12)
        loss = target_loss + config.loss_weight * lp_loss
        t.optimizer.zero_grad(set_to_none=True)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)
        t.scaler.update()
        t.scheduler.step()
        n = images.shape[0]
        sums += torch.stack([loss.detach(), target_loss.detach(), lp_loss.detach()]) * n
        seen += n
    loss_sum, target_sum, lp_sum = (sums / max(seen, 1)).tolist()
    return {
        "loss": loss_sum,
        "target_loss": target_sum,
        "lp_loss": lp_sum,
        "detach_taps": float(detach),
    }


def train_model(
    task: Task,
    num_classes: int,
    train_set: ImageDataset,
    config: TrainConfig,
    *,
    val_set: ImageDataset | None = None,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: dict | None = None,
    checkpoint_every: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train target model + loss-prediction module jointly on ``train_set``.

    Per epoch: ``history`` gets ``epoch`` (1-based), ``loss``, ``target_loss``, ``lp_loss``,
    ``detach_taps``, ``lr`` (at the epoch's end), ``seconds``, and ``val_*`` scalars from
    :func:`evaluate` when ``val_set`` is given; then ``checkpoint_every(state)`` receives a
    resumable state and ``on_epoch(epoch, epochs, metrics)`` is called. ``should_stop`` is
    polled before every batch; True raises :class:`TrainingCancelled`. ``resume``: a state from
    ``checkpoint_every`` (same data and settings; only device, amp, num_workers, loader may
    differ).
    Note: re-seeds torch's global generator (this is meant to own its process, as the worker does).
    """
    if val_set is not None:
        val_set.check_labels(task, num_classes)  # fail now, not after the first epoch
    t = _make_trainer(task, num_classes, train_set, config)
    history: list[dict[str, float]] = []
    start = 0
    if resume is not None:
        start = t.restore(resume, task, num_classes, config)
        history = [dict(h) for h in resume["history"]]
    state = t.state(start, config, history)
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        torch.manual_seed(epoch_seed(config.seed, epoch))
        t.generator.manual_seed(epoch_seed(config.seed, epoch) + 1)
        metrics = {"epoch": float(epoch + 1), **_train_one_epoch(t, config, epoch, should_stop)}
        metrics["lr"] = float(t.scheduler.get_last_lr()[0])
        if val_set is not None:
            scores = evaluate(t.model, val_set, batch_size=config.batch_size, device=str(t.device))
            metrics.update(
                {f"val_{k}": float(v) for k, v in scores.items() if not isinstance(v, list)}
            )
        metrics["seconds"] = time.perf_counter() - began
        history.append(metrics)
        state = t.state(epoch + 1, config, history)
        if checkpoint_every is not None:
            checkpoint_every(state)
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs, metrics)
    t.model.eval()
    loader: Loader = "device" if isinstance(t.loader, DeviceBatches) else "dataloader"
    return TrainResult(t.model, history, state, loader)


def _classification_metrics(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present in ``targets``, as
    sklearn's ``balanced_accuracy_score``) and per-class recall (None for absent classes).

    torchmetrics' ``average="macro"`` is not used for balanced accuracy: it counts a class that
    is predicted but absent from the targets as recall 0, which sklearn and the usual
    definition do not.
    """
    accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
    recall = MulticlassAccuracy(num_classes=num_classes, average=None)
    support = torch.bincount(targets, minlength=num_classes).tolist()
    per_class = recall(preds, targets).tolist()
    present = [r for r, s in zip(per_class, support, strict=True) if s > 0]
    return {
        "accuracy": float(accuracy(preds, targets)),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "per_class_recall": [r if s > 0 else None for r, s in zip(per_class, support, strict=True)],
        "per_class_support": support,
    }


def _segmentation_metrics(preds: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """preds, masks: ``[N, H, W]`` in {0, 1}. ``jaccard``/``dice`` are means over images (the
    ISIC 2017 challenge's convention; an image where both are empty scores 1);
    ``jaccard_global``/``dice_global`` pool all pixels (torchmetrics ``BinaryJaccardIndex``)."""
    p, m = preds.flatten(1).float(), masks.flatten(1).float()
    inter, p_sum, m_sum = (p * m).sum(1), p.sum(1), m.sum(1)
    union = p_sum + m_sum - inter
    jaccard = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    dice = torch.where(
        p_sum + m_sum > 0, 2 * inter / (p_sum + m_sum).clamp(min=1), torch.ones_like(union)
    )
    total = float(p_sum.sum() + m_sum.sum())
    return {
        "jaccard": float(jaccard.mean()),
        "dice": float(dice.mean()),
        "jaccard_global": float(BinaryJaccardIndex()(preds.flatten(), masks.flatten().long())),
        "dice_global": 2 * float(inter.sum()) / total if total > 0 else 1.0,
    }


@torch.inference_mode()
def evaluate(
    model: ActiveModel, data: ImageDataset, *, batch_size: int = 64, device: str = "auto"
) -> dict[str, Any]:
    """Score ``model`` on a labeled set (no augmentation, eval mode; the mode is restored after).

    Classification: ``accuracy``, ``balanced_accuracy``, ``per_class_recall`` (list, None for a
    class absent from the set), ``per_class_support`` (list), ``n``. Segmentation (threshold at
    probability 0.5): ``jaccard``, ``dice``, ``jaccard_global``, ``dice_global``, ``n``.
    """
    if len(data) == 0:
        raise ValueError("evaluate needs a non-empty labeled set")
    data.check_labels(model.task, model.num_classes)
    dev = resolve_device(device)
    was_training = model.training
    place_model(model, dev).eval()
    preds = []
    for images in device_batches(data, batch_size, dev):
        logits = model(images).logits
        if model.task == "classification":
            preds.append(logits.argmax(1).cpu())
        else:
            preds.append((logits[:, 0] > 0).to(torch.uint8).cpu())
    model.train(was_training)
    labels = data.targets if model.task == "classification" else data.masks
    assert labels is not None  # check_labels: a classification set has targets, else masks
    p, y = torch.cat(preds), torch.from_numpy(labels)
    scores = (
        _classification_metrics(p, y, model.num_classes)
        if model.task == "classification"
        else _segmentation_metrics(p, y)
    )
    return {**scores, "n": len(data)}
