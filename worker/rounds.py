"""The round runner: claim a round, do its work, record the outcome; durable across crashes.

A run works with no transaction open and records through ``worker.records``: short
transactions for progress, the model version once its checkpoint file exists, and one final
transaction for queue items + predictions + ``done`` + the event. Files are written before the
rows that name them (temp-then-rename), at keys a re-run overwrites
(``models/<project>/round-<n>.pt``, ``predictions/<model_version>/<image>.png``), and the model
version is one row per round, updated in place by a re-run. So re-running a round after a crash
at any point leaves one model version and one batch of queue items.

Outcomes: ``done``; ``failed`` with a clear ``error`` (bad project settings or data, or an
unexpected exception); ``cancelled`` (``cancel_requested`` seen between batches); ``lost`` (the
reaper re-queued the round meanwhile: this run writes nothing more); ``skipped`` (nothing to
claim: a duplicate message). Transient errors (database or broker connection) give the round
back (``queued``) and propagate, so the Celery task retries them with backoff.
"""

from __future__ import annotations

import logging
import math

from app.models import RoundStatus
from app.settings import Settings
from ml.selection import strategy_names
from ml.train import TrainingCancelled
from worker import coldstart, inputs, records, suspects
from worker.celery_app import TRANSIENT_ERRORS
from worker.heartbeat import Heartbeat, RoundStopped
from worker.inputs import RoundConfigError, RoundEnv, RoundRows
from worker.learning import ProgressWriter, learning_round, resume_key
from worker.records import Claim, QueueEntry, RoundResult

log = logging.getLogger(__name__)

MIN_TRAIN_IMAGES = 2


def run_round(round_id: int, settings: Settings, env: RoundEnv | None = None) -> str:
    """Run round ``round_id`` if it can be claimed; returns the outcome (see the module doc)."""
    own_env = env is None
    env = env or RoundEnv.from_settings(settings)
    try:
        claim = records.claim_round(env.sessions, round_id)
        if claim is None:
            log.info("round %s: nothing to claim (already taken or not queued)", round_id)
            return "skipped"
        log.info("round %s: claimed, attempt %s", round_id, claim.attempt)
        with Heartbeat(env.sessions, claim, settings.heartbeat_seconds) as heartbeat:
            outcome = _run_claimed(env, claim, heartbeat)
        if outcome != "lost":  # a later attempt may still resume from it
            env.storage.delete(resume_key(claim))
        log.info("round %s: %s", round_id, outcome)
        return outcome
    finally:
        if own_env:
            env.close()


def _run_claimed(env: RoundEnv, claim: Claim, heartbeat: Heartbeat) -> str:
    try:
        result = _execute(env, claim, heartbeat)
        outcome = records.finalize_round(env.sessions, env.settings, claim, result)
    except (TrainingCancelled, RoundStopped):
        if not heartbeat.owned:
            return "lost"
        records.end_round(env.sessions, env.settings, claim, RoundStatus.cancelled, None)
        return RoundStatus.cancelled.value
    except records.LostClaim:
        return "lost"
    except RoundConfigError as exc:
        records.end_round(env.sessions, env.settings, claim, RoundStatus.failed, str(exc))
        return RoundStatus.failed.value
    except TRANSIENT_ERRORS:
        _give_back(env, claim)
        raise
    except Exception as exc:
        log.exception("round %s failed", claim.round_id)
        error = f"Unexpected error ({type(exc).__name__}): {exc}. See the worker's log."
        records.end_round(env.sessions, env.settings, claim, RoundStatus.failed, error)
        return RoundStatus.failed.value
    return outcome


def _give_back(env: RoundEnv, claim: Claim) -> None:
    """Best effort: re-queue the round so the retry can claim it (else the reaper will)."""
    try:
        records.release_round(env.sessions, claim)
    except Exception:
        log.warning("round %s: could not give the round back", claim.round_id, exc_info=True)


def _execute(env: RoundEnv, claim: Claim, heartbeat: Heartbeat) -> RoundResult:
    if claim.strategy not in strategy_names():
        raise RoundConfigError(
            f"Unknown selection strategy {claim.strategy!r}; use one of {sorted(strategy_names())}."
        )
    rows = inputs.read_round_rows(env.sessions, claim)
    inputs.num_outputs(rows.project)  # fail early on a project that cannot train
    if rows.project.task == "segmentation" and claim.strategy == "entropy":
        raise RoundConfigError(
            "The entropy strategy needs class probabilities; a segmentation project has none. "
            "Choose another strategy (PATCH /projects/{id})."
        )
    labeled = rows.labeled_pool()
    claim = records.record_labeled_count(env.sessions, claim, len(labeled))
    heartbeat.claim = claim
    heartbeat.check()
    _flag_suspects(env, claim)
    if len(labeled) < MIN_TRAIN_IMAGES:
        return initial_selection(env, claim, rows, len(labeled))
    return learning_round(env, claim, heartbeat, rows, labeled)


def _flag_suspects(env: RoundEnv, claim: Claim) -> None:
    """Send suspect labels to review (worker.suspects); never fails the round."""
    try:
        suspects.flag_suspects(env.sessions, claim.project_id, claim.label_snapshot_id)
    except Exception:
        log.warning("round %s: the suspect-label check failed", claim.round_id, exc_info=True)


def initial_count(pool_size: int, fraction: float) -> int:
    """The size of the random initial set: ``fraction`` of the pool, at least one image."""
    return max(1, math.ceil(round(fraction * pool_size, 9))) if pool_size else 0


def initial_selection(env: RoundEnv, claim: Claim, rows: RoundRows, labeled: int) -> RoundResult:
    """No model yet: a random sample of the pool, seeded by the round id, or the project's
    ``cold_start`` (TypiClust / ProbCover in the warm-start embedding, worker.coldstart).

    With no labels at all it is ``initial_fraction`` of the pool (the paper's S0); with one
    label (too few to train) it is the round's budget B.
    """
    ProgressWriter(env, claim)(RoundStatus.selecting, step=rows.project.cold_start)
    covered = inputs.read_covered_images(env.sessions, claim.project_id)
    candidates = [row.id for row in rows.pool if row.id not in covered]
    wanted = (
        claim.budget if labeled else initial_count(len(rows.pool), rows.project.initial_fraction)
    )
    count = min(wanted, len(candidates))
    initial = coldstart.initial_picks(env, claim, rows, candidates, count)
    queue = [QueueEntry(candidates[i], None, None, None) for i in initial.picks]
    metrics = {
        "model": None,
        "labeled_count": labeled,
        "pool_size": len(rows.pool),
        "selected": len(queue),
        "note": f"{initial.note} Too few labeled pool images to train a model.",
        "cold_start": initial.step,
    }
    return RoundResult(queue, [], metrics, None, {"selected": len(queue), "step": initial.step})
