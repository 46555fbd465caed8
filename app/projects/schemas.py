"""Schemas of projects: their configuration (create / patch) and what the API returns.

Field-level rules (types, ranges, allowed names) live here; rules that combine fields (classes
against the task, the auto-round rule) live in ``app.projects.service`` so that a PATCH is
checked against the merged result.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
)

from app.labels.kinds import KINDS
from app.models import Project

# Selection strategies known to the worker, by name (the API never imports ``ml``).
Strategy = Literal[
    "random",
    "entropy",
    "coreset",
    "learning_loss",
    "confident_coreset",
    "cc_sum",
    "cc_rank",
    "sequential",
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def _known_task(task: str) -> str:
    if task not in KINDS:
        raise ValueError(f"the tasks are {sorted(KINDS)}")
    return task


# A project's task names its label kind (``app.labels.kinds``: the registry is the one list).
Task = Annotated[
    str,
    AfterValidator(_known_task),
    WithJsonSchema({"type": "string", "enum": sorted(KINDS)}),
]
ColdStart = Literal["random", "typiclust", "probcover"]
AutoRoundRule = Literal["off", "batch_done", "every_n"]

ProjectName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
ClassName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
# B per round: an int count >= 1, or a float fraction of the pool in (0, 1).
Budget = Annotated[StrictInt, Field(ge=1)] | Annotated[StrictFloat, Field(gt=0, lt=1)]
Alpha = Annotated[float, Field(ge=0, le=1)]
Overlap = Annotated[int, Field(ge=1, le=100)]
LeaseTtl = Annotated[int, Field(ge=10, le=7 * 24 * 3600)]
EveryN = Annotated[int, Field(ge=1)]
ImageSize = Annotated[int, Field(ge=8, le=2048)]
Epochs = Annotated[int, Field(ge=1, le=10_000)]
BatchSize = Annotated[int, Field(ge=2, le=4096)]  # >= 2: the ranking loss needs pairs
LearningRate = Annotated[float, Field(gt=0, le=10)]
GroupKey = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
_COLD_START = (
    "Round 0's initial set: at random, or TypiClust / ProbCover in the warm-start embedding."
)
_GROUP_KEY = (
    "Image-metadata key naming a group (HAM10000: 'lesion_id'): no batch holds two images "
    "of one group. null: no groups."
)
_EXCLUDE = "With group_key: no batch holds an image of a group that already has a label."
Share = Annotated[float, Field(ge=0, le=1)]
_REVIEW_SAMPLE = (
    "With overlap >= 2: the share of agreed images drawn for a reviewer's spot check (0: none)."
)
_MASK_AGREEMENT = (
    "With overlap >= 2 (segmentation): reads of an image whose pairwise Dice falls below this "
    "are disputed and go to the reviewer."
)
_WARM_START = (
    "Pretrain the backbone on the pool images (SimCLR, about 10 minutes on a 2-core CPU) when "
    "the first round is created; every later round trains from it."
)


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ProjectName
    task: Task
    classes: list[ClassName] | None = Field(
        default=None, description="Class names; segmentation defaults to ['lesion']."
    )
    budget: Budget = Field(default=0.05, description="Per round: a count, or a pool fraction.")
    initial_fraction: Annotated[float, Field(gt=0, le=1)] = 0.10
    strategy: Strategy = "confident_coreset"
    alpha: Alpha | None = Field(
        default=None, description="Defaults to 0.25 (classification) or 0.5 (segmentation)."
    )
    overlap: Overlap = 1
    lease_ttl_seconds: LeaseTtl = 600
    require_lease: bool = False
    auto_round: AutoRoundRule = "off"
    auto_round_every: EveryN | None = None
    image_size: ImageSize = 64
    epochs: Epochs = 10
    batch_size: BatchSize = 32
    learning_rate: LearningRate | None = None
    cold_start: ColdStart = Field(default="random", description=_COLD_START)
    group_key: GroupKey | None = Field(default=None, description=_GROUP_KEY)
    exclude_labeled_groups: bool = Field(default=False, description=_EXCLUDE)
    warm_start: bool = Field(default=False, description=_WARM_START)
    review_sample: Share = Field(default=0.0, description=_REVIEW_SAMPLE)
    mask_agreement: Share = Field(default=0.7, description=_MASK_AGREEMENT)


class ProjectUpdate(BaseModel):
    """The mutable settings; fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    budget: Budget | None = None
    strategy: Strategy | None = None
    alpha: Alpha | None = None
    overlap: Overlap | None = None
    lease_ttl_seconds: LeaseTtl | None = None
    require_lease: bool | None = None
    auto_round: AutoRoundRule | None = None
    auto_round_every: EveryN | None = None
    image_size: ImageSize | None = None
    epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate: LearningRate | None = Field(
        default=None, description="null resets it to the worker's default."
    )
    cold_start: ColdStart | None = Field(default=None, description=_COLD_START)
    group_key: GroupKey | None = Field(default=None, description=_GROUP_KEY)
    exclude_labeled_groups: bool | None = Field(default=None, description=_EXCLUDE)
    warm_start: bool | None = Field(default=None, description=_WARM_START)
    review_sample: Share | None = Field(default=None, description=_REVIEW_SAMPLE)
    mask_agreement: Share | None = Field(default=None, description=_MASK_AGREEMENT)


class ProjectOut(BaseModel):
    id: int
    name: str
    task: str
    classes: list[str]
    budget: int | float
    initial_fraction: float
    strategy: str
    alpha: float
    overlap: int
    lease_ttl_seconds: int
    require_lease: bool
    auto_round: str
    auto_round_every: int | None
    image_size: int
    epochs: int
    batch_size: int
    learning_rate: float | None
    cold_start: str
    group_key: str | None
    exclude_labeled_groups: bool
    warm_start: bool
    review_sample: float
    mask_agreement: float
    created_at: datetime


class ProjectCounts(BaseModel):
    images: dict[str, int] = Field(description="Images per split (pool, val, test).")
    labeled: int = Field(
        description="Pool images with a current label (with several readers per image: a "
        "consensus of their reads)."
    )
    queued: int = Field(description="Queue items that still need labels.")
    leased: int = Field(description="Active, unexpired leases.")
    rounds: int


class ProjectDetail(ProjectOut):
    counts: ProjectCounts


def project_out(project: Project) -> ProjectOut:
    """The API view of a project row (the budget column pair becomes one ``budget``)."""
    data = {name: getattr(project, name) for name in ProjectOut.model_fields if name != "budget"}
    budget = project.budget_count if project.budget_count is not None else project.budget_fraction
    return ProjectOut.model_validate({**data, "budget": budget})
