"""The warm-start job: SimCLR-pretrain a project's backbone on its pool images, once, like a round.

It mirrors the round runner (``worker.rounds``, ``worker.records``, ``worker.heartbeat``,
``worker.reaper``) on the project's one ``warm_starts`` row:

- claim: ``queued`` -> ``training`` with ``attempt + 1``; every later write of the run is fenced
  by ``id``, ``attempt`` and ``status = training`` (a late write of a run the reaper replaced
  changes nothing and raises :class:`worker.records.LostClaim`);
- a heartbeat thread refreshes ``heartbeat_at`` and watches ``cancel_requested``; the
  pretraining loop polls it before every batch (:class:`ml.pretrain.PretrainCancelled`);
- progress like a round's: ``{"phase": "training", "step": "pretraining", "epoch", "epochs",
  "loss", "pool_size"}`` (``step`` "loading" while the pool is decoded);
- a resumable state at ``models/<project>/warm-start.resume.pt`` (at most once a minute, and
  after every epoch that took longer), fingerprinted by the pool's image ids and the settings;
  an attempt after a crash, a retry after a failure, or a restart after a cancel resumes from it;
- done: the backbone's ResNet-18 state_dict at ``models/<project>/warm-start.pt`` (temp then
  rename, sha256 recorded), then one fenced transaction sets ``done``, the key, the sha256, the
  metrics and the ``warm_start.done`` event;
- the reaper (``worker.pretrain_records.reap_warm_starts``, run by ``round.reap``) re-queues
  a warm start whose heartbeat stopped, or fails it after ``round_max_attempts``, and
  re-sends queued ones (the database side is ``worker.pretrain_records``, free of torch).

It reads pool images only (``split = pool``): never a test image. Every later round of the
project trains from the result: ``worker.learning.train_config`` sets
``TrainConfig.weights_path = warm_start_weights(env, project_id)``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from app.db import unit_of_work
from app.models import Image, Project, RoundStatus, Split
from app.settings import Settings
from ml.checkpoint import save_checkpoint
from ml.pretrain import PretrainConfig, PretrainResult, default_epochs, pretrain_backbone
from ml.train import TrainingCancelled
from worker import inputs
from worker.celery_app import TRANSIENT_ERRORS
from worker.heartbeat import Heartbeat
from worker.inputs import ImageRow, RoundEnv
from worker.pretrain_records import (
    WarmClaim,
    beat,
    checkpoint_key,
    claim_warm_start,
    end,
    finish,
    release,
    resume_key,
    set_progress,
    warm_start_weights_path,
)
from worker.records import LostClaim, Sessions

log = logging.getLogger(__name__)

RESUME_EVERY_SECONDS = 60.0
PROGRESS_EVERY_SECONDS = 1.0
MIN_POOL_IMAGES = 2
_TRAINING = RoundStatus.training.value


class WarmStartError(Exception):
    """The project cannot be pretrained (e.g. too few pool images); shown to the user."""


class WarmStartStopped(Exception):
    """Raised between phases when the warm start was cancelled or is no longer this run's."""


def WarmHeartbeat(  # noqa: N802 (a constructor, named like the class it builds)
    sessions: Sessions, claim: WarmClaim, interval_seconds: float, poll_seconds: float = 2.0
) -> Heartbeat:
    """:class:`worker.heartbeat.Heartbeat` for a warm start: the same thread, polls and
    flags, beating the ``warm_starts`` row; ``check`` raises :class:`WarmStartStopped`."""
    return Heartbeat(
        sessions,
        None,
        interval_seconds,
        poll_seconds,
        beat=lambda write: beat(sessions, claim, write=write),
        label=f"warm start {claim.warm_start_id} attempt {claim.attempt}",
        stopped=WarmStartStopped,
    )


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRows:
    image_size: int
    pool: list[ImageRow]


def read_pool(sessions: Sessions, project_id: int) -> PoolRows:
    """The project's image size and its pool images by id (never the test split)."""
    with unit_of_work(sessions) as session:
        size = session.scalar(select(Project.image_size).where(Project.id == project_id))
        rows = session.execute(
            select(Image.id, Image.storage_key, Image.width, Image.height)
            .where(Image.project_id == project_id, Image.split == Split.pool.value)
            .order_by(Image.id)
        )
        pool = [ImageRow(r.id, r.storage_key, r.width, r.height) for r in rows]
    if size is None:
        raise WarmStartError(f"Project {project_id} does not exist.")
    return PoolRows(int(size), pool)


def pretrain_config(
    env: RoundEnv, project_id: int, image_size: int, n_images: int
) -> PretrainConfig:
    """The job's settings: the project's image size, seeded by the project, and the default
    epochs for this device and pool size (about 10 minutes on the 2-core CPU)."""
    device = env.settings.device
    return PretrainConfig(
        epochs=default_epochs(device, n_images, image_size),
        image_size=image_size,
        seed=project_id,
        device=device,
    )


def _config_from(state: dict[str, Any], device: str) -> PretrainConfig:
    """The settings a resumable state was made with (its epochs included), on ``device``."""
    saved = dict(state["config"])
    for name in ("crop_scale", "crop_ratio"):
        saved[name] = tuple(saved[name])
    return PretrainConfig(**{**saved, "device": device})


def _pretrain(
    env: RoundEnv, claim: WarmClaim, heartbeat: Heartbeat
) -> tuple[PretrainResult, PretrainConfig, int]:
    rows = read_pool(env.sessions, claim.project_id)
    if len(rows.pool) < MIN_POOL_IMAGES:
        raise WarmStartError(
            f"The warm start needs at least {MIN_POOL_IMAGES} pool images; project "
            f"{claim.project_id} has {len(rows.pool)}. Upload images, then start it again."
        )
    last = 0.0

    def progress(force: bool = False, **values: Any) -> None:
        nonlocal last
        if force or time.monotonic() - last >= PROGRESS_EVERY_SECONDS:
            set_progress(env.sessions, claim, {"phase": _TRAINING, **values})
            last = time.monotonic()

    def on_loaded(done: int, total: int) -> None:
        progress(step="loading", loaded=done, total=total)

    pixels = inputs.load_pixels(env.storage, rows.pool, rows.image_size, on_loaded)
    heartbeat.check()
    fingerprint = {
        "warm_start_id": claim.warm_start_id,
        "image_size": rows.image_size,
        "pool_image_ids": [row.id for row in rows.pool],
    }
    key = resume_key(claim.project_id)
    resume = inputs.resume_state(env, key, fingerprint)
    if resume is not None:
        config = _config_from(resume, env.settings.device)
    else:
        config = pretrain_config(env, claim.project_id, rows.image_size, len(rows.pool))
    last_saved = -math.inf

    def save_resumable(state: dict[str, Any]) -> None:
        nonlocal last_saved
        if state["epoch"] >= config.epochs or time.monotonic() - last_saved < RESUME_EVERY_SECONDS:
            return
        save_checkpoint(env.storage.path(key), {**state, "coreloop_resume": fingerprint})
        last_saved = time.monotonic()

    def on_epoch(epoch: int, epochs: int, metrics: dict[str, float]) -> None:
        progress(
            force=True,
            step="pretraining",
            epoch=epoch,
            epochs=epochs,
            loss=metrics.get("loss"),
            pool_size=len(rows.pool),
        )

    start = 0 if resume is None else int(resume["epoch"])
    progress(force=True, step="pretraining", epoch=start, epochs=config.epochs)
    result = pretrain_backbone(
        pixels,
        config,
        on_epoch=on_epoch,
        should_stop=heartbeat.should_stop,
        resume=resume,
        checkpoint_every=save_resumable,
    )
    return result, config, len(rows.pool)


def run_warm_start(warm_start_id: int, settings: Settings, env: RoundEnv | None = None) -> str:
    """Run the warm start if it can be claimed. Returns ``done``, ``failed``, ``cancelled``,
    ``lost`` (re-queued by the reaper meanwhile) or ``skipped`` (nothing to claim)."""
    own_env = env is None
    env = env or RoundEnv.from_settings(settings)
    try:
        claim = claim_warm_start(env.sessions, warm_start_id)
        if claim is None:
            log.info("warm start %s: nothing to claim", warm_start_id)
            return "skipped"
        log.info("warm start %s: claimed, attempt %s", warm_start_id, claim.attempt)
        with WarmHeartbeat(env.sessions, claim, settings.heartbeat_seconds) as heartbeat:
            outcome = _run_claimed(env, claim, heartbeat)
        if outcome == RoundStatus.done.value:  # else a restart resumes from it
            env.storage.delete(resume_key(claim.project_id))
        log.info("warm start %s: %s", warm_start_id, outcome)
        return outcome
    finally:
        if own_env:
            env.close()


def _run_claimed(env: RoundEnv, claim: WarmClaim, heartbeat: Heartbeat) -> str:
    try:
        began = time.perf_counter()
        result, config, pool_size = _pretrain(env, claim, heartbeat)
        heartbeat.check()
        key = checkpoint_key(claim.project_id)
        sha256 = save_checkpoint(env.storage.path(key), result.state_dict)
        metrics = {
            "method": "simclr",
            "history": result.history,
            "loss": result.history[-1]["loss"] if result.history else None,
            "pool_size": pool_size,
            "config": {k: v for k, v in asdict(config).items() if k != "device"},
            "device": env.device,
            "seconds": time.perf_counter() - began,
        }
        return finish(env.sessions, env.settings, claim, key, sha256, metrics)
    except (TrainingCancelled, WarmStartStopped):
        if not heartbeat.owned:
            return "lost"
        end(env.sessions, env.settings, claim, RoundStatus.cancelled, None)
        return RoundStatus.cancelled.value
    except LostClaim:
        return "lost"
    except WarmStartError as exc:
        end(env.sessions, env.settings, claim, RoundStatus.failed, str(exc))
        return RoundStatus.failed.value
    except TRANSIENT_ERRORS:
        try:
            release(env.sessions, claim)
        except Exception:
            log.warning("warm start %s: could not give it back", claim.warm_start_id)
        raise
    except Exception as exc:
        log.exception("warm start %s failed", claim.warm_start_id)
        error = f"Unexpected error ({type(exc).__name__}): {exc}. See the worker's log."
        end(env.sessions, env.settings, claim, RoundStatus.failed, error)
        return RoundStatus.failed.value


def warm_start_weights(env: RoundEnv, project_id: int) -> str | None:
    """The local path of the project's pretrained backbone when its warm start is done (for
    ``TrainConfig.weights_path``), else None (no warm start, or not finished yet)."""
    return warm_start_weights_path(env.sessions, env.storage, project_id)
