"""What every label kind provides, and the values the consensus rule passes around.

A *kind* is what a project's labels hold: a class (classification), a mask (segmentation).
The rules that differ by kind live in the kind's module (``classification.py``,
``segmentation.py``); the rest of the server asks the registry (``app.labels.kinds``) for the
project's kind instead of comparing task names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from app.labels.masks import Mask

State = Literal["single", "settled", "agreed", "majority"]


@dataclass(frozen=True)
class Read:
    """One label row as the consensus rule sees it."""

    label_id: int
    image_id: int
    author_id: int | None
    class_index: int | None
    mask_key: str | None
    authoritative: bool  # by an admin, a reviewer or from an import: settles the image


@dataclass(frozen=True)
class CurrentLabel:
    """An image's label under the consensus rule (``app.labels.consensus``)."""

    image_id: int
    class_index: int | None
    mask_keys: tuple[str, ...]  # one mask as is; several: their per-pixel majority
    label_ids: tuple[int, ...]  # the labels it rests on
    state: State

    @property
    def label_id(self) -> int:
        """The newest label it rests on."""
        return max(self.label_ids)


@dataclass(frozen=True)
class Disputed:
    """An image with its k reads (or more) that do not agree: it waits for adjudication."""

    image_id: int
    label_ids: tuple[int, ...]
    class_indexes: tuple[int, ...]


@dataclass(frozen=True)
class Submission:
    """A label as submitted, with what the kind checks it against.

    ``decoded``: a mask decoded already (before the transaction began), when there is one.
    """

    project_id: int
    classes: Sequence[Any]
    height: int
    width: int
    class_index: int | None
    class_name: str | None
    mask_rle: Any | None
    mask_png: bytes | None
    decoded: Mask | None = None

    @property
    def has_mask(self) -> bool:
        return self.mask_rle is not None or self.mask_png is not None or self.decoded is not None

    @property
    def has_class(self) -> bool:
        return self.class_index is not None or self.class_name is not None


@dataclass(frozen=True)
class Content:
    """A checked label's content: what goes into the label row (the mask once stored)."""

    class_index: int | None = None
    mask: Mask | None = None


class LabelKind(ABC):
    """The rules of one kind of label.

    A new kind (boxes, say) is a subclass in its own module, listed in ``KINDS``
    (``app.labels.kinds``), plus a migration that adds its content columns to ``label`` and its
    name to the project's task check.
    """

    name: ClassVar[str]
    default_alpha: ClassVar[float]  # confident coreset's alpha for new projects (METHOD.md)
    ls_control: ClassVar[str]  # the Label Studio control tag that edits it
    own_formats: ClassVar[frozenset[str]]  # export/import formats that carry only this kind
    takes_class: ClassVar[bool] = False  # a label holds a class index
    takes_mask: ClassVar[bool] = False  # a label holds a mask

    @abstractmethod
    def checked_classes(self, classes: list[str] | None) -> list[str]:
        """A new project's classes, checked (and defaulted) for this kind; the project service
        turns its ``InvalidInput`` into ``InvalidProjectConfig``."""

    @abstractmethod
    def content(self, submitted: Submission) -> Content:
        """The submitted label's content, checked; raises ``InvalidInput`` with a clear code."""

    @abstractmethod
    def combine(self, latest: Sequence[Read]) -> CurrentLabel | Disputed:
        """The consensus of one image's k latest reads (one per reader, oldest first)."""
