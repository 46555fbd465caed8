"""The label-kind registry: one module per kind, looked up by the project's task.

>>> kind_of("classification").takes_class
True

Adding a kind (boxes, say): a module here with a :class:`LabelKind` subclass, its entry in
``KINDS``, and a migration for its content columns on ``label``. ``KINDS`` is the one list of
kinds: a project's ``task`` (``app.projects.schemas.Task``) accepts exactly its names, and
everything that differs by kind asks :func:`kind_of` instead of comparing task names.
"""

from __future__ import annotations

from app.errors import InvalidInput
from app.labels.kinds.base import (
    Content,
    CurrentLabel,
    Disputed,
    LabelKind,
    Read,
    State,
    Submission,
)
from app.labels.kinds.classification import Classification
from app.labels.kinds.segmentation import Segmentation

KINDS: dict[str, LabelKind] = {kind.name: kind for kind in (Classification(), Segmentation())}


def kind_of(task: str) -> LabelKind:
    """The kind of a project's labels, by its task name."""
    try:
        return KINDS[task]
    except KeyError:
        raise InvalidInput(
            f"Unknown task {task!r}; the kinds are {sorted(KINDS)}.", code="UnknownTask"
        ) from None


__all__ = [
    "KINDS",
    "Content",
    "CurrentLabel",
    "Disputed",
    "LabelKind",
    "Read",
    "State",
    "Submission",
    "kind_of",
]
