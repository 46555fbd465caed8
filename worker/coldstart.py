"""Round 0's initial set (issue 12, item 4): at random, or TypiClust / ProbCover
(:mod:`ml.coldstart`) in the embedding of the warm-start backbone (``worker.pretrain``; an
untrained, seeded ResNet-18 until it is done), by the project's
``cold_start`` option; with the project's ``group_key``, one image per group at most.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.coldstart import embed_pool, probcover, typiclust
from worker import inputs
from worker.inputs import RoundEnv, RoundRows
from worker.pretrain_records import warm_start_weights_path
from worker.records import Claim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitialPicks:
    """``picks``: indices into the candidates, in pick order; ``step``: the method used;
    ``note``: one sentence for the round's metrics."""

    picks: list[int]
    step: str
    note: str


def _first_per_group(order: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    if groups is None or len(order) == 0:
        return order
    g = groups[order]
    keep = g < 0
    keep[np.unique(g, return_index=True)[1]] = True
    return order[keep]


def initial_picks(
    env: RoundEnv, claim: Claim, rows: RoundRows, candidates: list[int], count: int
) -> InitialPicks:
    """Pick ``count`` of ``candidates`` (pool image ids, none labeled or queued), fewer when
    the groups run out. ``random`` without groups draws exactly what it always drew."""
    project = rows.project
    method = project.cold_start if project.cold_start in ("typiclust", "probcover") else "random"
    allowed, groups = _candidate_groups(rows, candidates)
    if count <= 0 or not len(allowed):
        return InitialPicks([], method, "Nothing to select.")
    rng = np.random.default_rng(claim.round_id)
    if method == "random":
        if groups is None:
            picks = rng.choice(len(allowed), size=min(count, len(allowed)), replace=False)
        else:
            picks = _first_per_group(rng.permutation(len(allowed)), groups)[:count]
        return InitialPicks([int(allowed[i]) for i in picks], "random", "Random initial selection.")
    by_id = {row.id: row for row in rows.pool}
    chosen = [by_id[candidates[i]] for i in allowed]
    pixels = inputs.load_pixels(env.storage, chosen, project.image_size)
    weights = _warm_start(env, claim.project_id)
    features = embed_pool(pixels, weights, seed=0, device=env.device)
    if method == "typiclust":
        picks = typiclust(features, count, seed=claim.round_id, groups=groups)
    else:
        n_clusters = max(2, len(project.classes))
        picks = probcover(
            features, count, n_clusters=n_clusters, seed=claim.round_id, groups=groups
        )
    space = "the warm-start embedding" if weights else "an untrained ResNet-18's features"
    note = f"{method} initial selection in {space}."
    return InitialPicks([int(allowed[i]) for i in picks], method, note)


def _warm_start(env: RoundEnv, project_id: int) -> Path | None:
    """The project's finished warm-start backbone (worker.pretrain), else None: then the
    embedding is an untrained, seeded ResNet-18's."""
    path = warm_start_weights_path(env.sessions, env.storage, project_id)
    if path is None:
        log.info("project %s: no warm start yet; cold start in untrained features", project_id)
        return None
    return Path(path)


def _candidate_groups(
    rows: RoundRows, candidates: list[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """(indices into ``candidates`` that may be picked, their groups or None). With
    ``exclude_labeled_groups`` a candidate whose group has a labeled or queued image (a pool
    image outside ``candidates``) may not be picked."""
    allowed = np.arange(len(candidates))
    if rows.groups is None:
        return allowed, None
    index = {row.id: i for i, row in enumerate(rows.pool)}
    groups = rows.groups[[index[i] for i in candidates]].astype(np.int64)
    if rows.project.exclude_labeled_groups:
        covered = set(index) - set(candidates)
        taken = [int(rows.groups[index[i]]) for i in covered if rows.groups[index[i]] >= 0]
        allowed = allowed[~np.isin(groups, taken)]
    return allowed, groups[allowed]
