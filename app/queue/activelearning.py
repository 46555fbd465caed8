"""A MONAI Label-style next-sample call for viewers that speak it (3D Slicer, OHIF plugins).

``POST /activelearning/{strategy}`` with a JSON body ``{"project_id": ..., ...}`` (other keys,
such as MONAI clients' ``client_id``, are accepted and ignored) answers with the next image of
the caller's queue, leased to the caller exactly as ``GET /queue?limit=1`` would (same atomic
leasing; the caller's active lease comes first, so asking again returns the same image until it
is labeled, released or skipped). MONAI Label answers ``{"id", "path", ...image info}``; here:
``id`` (a string, as MONAI image ids are), ``name``, ``path`` and ``url`` (the image's URL
path), ``checksum`` (``SHA256:<hex>``, Slicer's download check), ``weight`` (the item's
selection score), plus ``image_id``, ``lease_id``, ``expires_at``, ``round``, ``rank``,
``scores`` and ``strategy`` (what ranked the queue).

Strategy names: the server always answers from the project's ranked queue (the first round
is a random sample, later rounds the project's strategy). Accepted in the path: the project's
own strategy name, and the aliases ``first`` and ``random``, the names MONAI Label apps and
viewer defaults use; any other name is 404 ``StrategyNotFound``. When nothing is left to label
the answer is 404 ``NoSampleLeft`` in the error envelope (MONAI Label itself answers ``{}``).
"""

from __future__ import annotations

import time
from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from app.deps import CurrentUser, SessionDep, SettingsDep
from app.errors import NotFound
from app.images.service import get_image
from app.members.service import require_annotator
from app.queue.schemas import Scores
from app.queue.service import lease_next_items, require_project

router = APIRouter(prefix="/activelearning", tags=["activelearning"])

STRATEGY_ALIASES = ("first", "random")


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    project_id: int


class NextSample(BaseModel):
    id: str
    image_id: int
    name: str
    path: str
    url: str
    checksum: str
    weight: float | None
    strategy: str
    lease_id: int
    expires_at: datetime
    round: int
    rank: int
    scores: Scores
    ts: int


def accepted_strategies(project_strategy: str) -> list[str]:
    return [project_strategy, *(a for a in STRATEGY_ALIASES if a != project_strategy)]


@router.post(
    "/{strategy}",
    responses={404: {"description": "StrategyNotFound, ProjectNotFound or NoSampleLeft"}},
)
def next_sample(
    strategy: str,
    body: SampleRequest,
    session: SessionDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> NextSample:
    """The next image to label for the caller, leased (see the module doc)."""
    project = require_project(session, body.project_id)
    require_annotator(session, user, project.id)
    accepted = accepted_strategies(project.strategy)
    if strategy not in accepted:
        raise NotFound(
            f"Strategy {strategy!r} is not offered by project {project.id}; use one of {accepted}.",
            code="StrategyNotFound",
        )
    entries = lease_next_items(session, settings, user, project.id, 1)
    if not entries:
        raise NotFound(
            f"Nothing is left for you to label in project {project.id}: the queue is empty or "
            "every item is leased or labeled. Ask again after the next round.",
            code="NoSampleLeft",
        )
    entry = entries[0]
    image = get_image(session, entry.image_id)
    return NextSample(
        id=str(image.id),
        image_id=image.id,
        name=image.filename,
        path=entry.image_url,
        url=entry.image_url,
        checksum=f"SHA256:{image.sha256}",
        weight=entry.scores.score,
        strategy=project.strategy,
        lease_id=entry.lease_id,
        expires_at=entry.expires_at,
        round=entry.round,
        rank=entry.rank,
        scores=entry.scores,
        ts=int(time.time()),
    )
