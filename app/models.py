"""Database models: the data model of ``shared/design/ARCHITECTURE.md``.

Alembic (``migrations/``) owns the schema; these classes describe it. Relationships are
``lazy="raise"``: every query says what it loads.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use timezone-aware UTC datetimes")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Role(enum.StrEnum):
    admin = "admin"
    annotator = "annotator"
    # A Label Studio connection's credential: works on /ls/* only, where it may speak for
    # existing members (app.integrations.labelstudio.endpoints); refused everywhere else.
    integration = "integration"
    # Settles disagreements between readers (issue 15): a member of a project as its reviewer
    # sees every read of it; the role is also a project membership's (MemberRole).
    reviewer = "reviewer"


class MemberRole(enum.StrEnum):
    """A user's role in one project (``project_members``); admin stays a global role."""

    annotator = "annotator"
    reviewer = "reviewer"


class Split(enum.StrEnum):
    pool = "pool"
    val = "val"
    test = "test"


class LabelSource(enum.StrEnum):
    human = "human"
    import_ = "import"
    model = "model"
    label_studio = "label-studio"
    # A reviewer's settlement of an image's reads (issue 15): like an import, it settles.
    review = "review"


class LeaseState(enum.StrEnum):
    active = "active"
    done = "done"
    released = "released"
    skipped = "skipped"


class RoundStatus(enum.StrEnum):
    queued = "queued"
    training = "training"
    scoring = "scoring"
    selecting = "selecting"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE_ROUND_STATUSES = (
    RoundStatus.queued,
    RoundStatus.training,
    RoundStatus.scoring,
    RoundStatus.selecting,
)
_ACTIVE_SQL = "status IN ('queued', 'training', 'scoring', 'selecting')"


class AutoRound(enum.StrEnum):
    off = "off"
    batch_done = "batch_done"
    every_n = "every_n"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # None: the token never expires. Revoking replaces token_hash (migration 0004).
    token_expires_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    task: Mapped[str] = mapped_column(String(20))
    classes: Mapped[list[Any]] = mapped_column(JSON)
    # Budget B per round: exactly one of a count or a fraction of the pool.
    budget_count: Mapped[int | None] = mapped_column(Integer)
    budget_fraction: Mapped[float | None] = mapped_column(Float)
    initial_fraction: Mapped[float] = mapped_column(Float, default=0.10)
    strategy: Mapped[str] = mapped_column(String(50), default="confident_coreset")
    alpha: Mapped[float] = mapped_column(Float)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    lease_ttl_seconds: Mapped[int] = mapped_column(Integer, default=600)
    require_lease: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_round: Mapped[str] = mapped_column(String(20), default=AutoRound.off.value)
    auto_round_every: Mapped[int | None] = mapped_column(Integer)
    # Training recipe (the worker's defaults unless set).
    image_size: Mapped[int] = mapped_column(Integer, default=64)
    epochs: Mapped[int] = mapped_column(Integer, default=10)
    batch_size: Mapped[int] = mapped_column(Integer, default=32)
    learning_rate: Mapped[float | None] = mapped_column(Float)
    # Selection options (issue 12, migration 0005): round 0's picker ("random", "typiclust",
    # "probcover"), and the image-metadata key naming a group (HAM10000: "lesion_id") that no
    # batch holds twice; with exclude_labeled_groups, no batch touches a labeled group either.
    cold_start: Mapped[str] = mapped_column(String(20), default="random")
    group_key: Mapped[str | None] = mapped_column(String(100))
    exclude_labeled_groups: Mapped[bool] = mapped_column(Boolean, default=False)
    # Self-supervised warm start (issue 12, migration 0006): when set, creating a round queues
    # the project's warm start (once); every later round trains from its backbone.
    warm_start: Mapped[bool] = mapped_column(Boolean, default=False)
    # Several readers (issue 15, migration 0008): the share of agreed images a reviewer
    # spot-checks, and the pairwise Dice of masks below which the reads are disputed.
    review_sample: Mapped[float] = mapped_column(Float, default=0.0)
    mask_agreement: Mapped[float] = mapped_column(Float, default=0.7)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProjectMember(Base):
    """Who may work on a project, and as what (migration 0007). Admins need no row: they reach
    every project. Any other user reaches only the projects they are a member of."""

    __tablename__ = "project_members"
    __table_args__ = (
        UniqueConstraint("project_id", "user_id"),
        Index("ix_project_members_user", "user_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(20), default=MemberRole.annotator.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReviewState(enum.StrEnum):
    open = "open"
    settled = "settled"
    sent_back = "sent_back"


class ReviewItem(Base):
    """An image a reviewer must look at (migration 0008): its reads disagree (``disputed``),
    or it was drawn for a spot check (``spot_check``). At most one open item per image. Open
    items are leased to one reviewer at a time (``leased_by`` until ``lease_expires_at``)."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index("ix_review_items_project_state", "project_id", "state", "id"),
        Index(
            "uq_review_items_one_open",
            "image_id",
            unique=True,
            sqlite_where=text("state = 'open'"),
            postgresql_where=text("state = 'open'"),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    reason: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), default=ReviewState.open.value)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    leased_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    settled_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    settled_label_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column()


class ReviewSkip(Base):
    """A reviewer skipped an item: it is not offered to them again."""

    __tablename__ = "review_skips"
    review_item_id: Mapped[int] = mapped_column(
        ForeignKey("review_items.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "sha256"),
        Index("ix_images_project_split", "project_id", "split"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(500))
    content_type: Mapped[str] = mapped_column(String(100))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(String(10), default=Split.pool.value)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Label(Base):
    """Append-only: a newer label of the same image supersedes, history stays."""

    __tablename__ = "labels"
    __table_args__ = (
        Index("ix_labels_image_created", "image_id", "id"),
        # Idempotency keys are the author's own (migration 0004): one user's key never
        # answers, nor blocks, another's request. Author-less rows (CLI imports) share one
        # key space.
        UniqueConstraint("author_id", "idempotency_key"),
        Index(
            "uq_labels_idempotency_key_no_author",
            "idempotency_key",
            unique=True,
            sqlite_where=text("author_id IS NULL"),
            postgresql_where=text("author_id IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    author_name: Mapped[str | None] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20), default=LabelSource.human.value)
    class_index: Mapped[int | None] = mapped_column(Integer)
    mask_key: Mapped[str | None] = mapped_column(String(500))
    lease_id: Mapped[int | None] = mapped_column(ForeignKey("leases.id"))
    idempotency_key: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("project_id", "number"),
        # At most one queued or running round per project, enforced by the database.
        Index(
            "uq_rounds_one_active",
            "project_id",
            unique=True,
            sqlite_where=text(_ACTIVE_SQL),
            postgresql_where=text(_ACTIVE_SQL),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=RoundStatus.queued.value)
    strategy: Mapped[str] = mapped_column(String(50))
    alpha: Mapped[float] = mapped_column(Float)
    budget: Mapped[int] = mapped_column(Integer)
    # The labels the round trains on: every label with id <= this, recorded at claim time.
    label_snapshot_id: Mapped[int | None] = mapped_column(BigInteger)
    labeled_count: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class WarmStart(Base):
    """A project's self-supervised warm start (SimCLR on its pool images): one row per project,
    run like a round (claimed with ``attempt``, heartbeat, progress, cancel, re-queued by the
    reaper) by ``worker.pretrain``. ``status`` takes the round statuses ``queued``,
    ``training``, ``done``, ``failed``, ``cancelled``; when done, ``checkpoint_key`` names the
    ResNet-18 state_dict every later round starts from."""

    __tablename__ = "warm_starts"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), unique=True
    )
    status: Mapped[str] = mapped_column(String(20), default=RoundStatus.queued.value)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    checkpoint_key: Mapped[str | None] = mapped_column(String(500))
    sha256: Mapped[str | None] = mapped_column(String(64))
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class ModelVersion(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), unique=True)
    checkpoint_key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class QueueItem(Base):
    __tablename__ = "queue_items"
    __table_args__ = (
        UniqueConstraint("round_id", "image_id"),
        UniqueConstraint("round_id", "rank"),
        Index("ix_queue_items_project_order", "project_id", "round_id", "rank"),
        # The leasing scan walks only items that still need labels (migration 0003).
        Index(
            "ix_queue_items_open",
            "project_id",
            "round_id",
            "rank",
            sqlite_where=text("labels_needed > 0"),
            postgresql_where=text("labels_needed > 0"),
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    rank: Mapped[int] = mapped_column(Integer)
    min_distance: Mapped[float | None] = mapped_column(Float)
    predicted_loss: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    # Labels still wanted for this item (starts at the project's overlap); a cached count
    # kept in step with labels by the label service so leasing needs no aggregate query.
    labels_needed: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Lease(Base):
    __tablename__ = "leases"
    __table_args__ = (
        Index("ix_leases_item_state", "queue_item_id", "state"),
        Index("ix_leases_user_state", "user_id", "state"),
        Index("ix_leases_item_user", "queue_item_id", "user_id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    queue_item_id: Mapped[int] = mapped_column(ForeignKey("queue_items.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    state: Mapped[str] = mapped_column(String(20), default=LeaseState.active.value)
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Prediction(Base):
    """A model version's output for one pool image: pre-annotation for the UI."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("model_version_id", "image_id"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE")
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    class_probs: Mapped[list[Any] | None] = mapped_column(JSON)
    mask_key: Mapped[str | None] = mapped_column(String(500))
    predicted_loss: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Append-only audit trail (who did what, when); later feeds webhooks."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(50))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# Tables defined beside these (same Base): imported so Base.metadata (and Alembic) knows them.
import app.webhooks.models  # noqa: E402, F401
