"""Classification: a label is one of the project's classes; readers agree by majority."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

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


class Classification(LabelKind):
    name = "classification"
    default_alpha = 0.25
    ls_control = "Choices"
    own_formats = frozenset({"csv"})
    takes_class = True

    def checked_classes(self, classes: list[str] | None) -> list[str]:
        if not classes or len(classes) < 2:
            raise InvalidInput("A classification project needs at least 2 classes.")
        seen: set[str] = set()
        for name in classes:
            if name.casefold() in seen:
                raise InvalidInput(f"Class {name!r} is listed twice; class names are unique.")
            seen.add(name.casefold())
        return classes

    def content(self, submitted: Submission) -> Content:
        if submitted.has_mask:
            raise InvalidInput(
                f"Project {submitted.project_id} is a classification project; send a class, "
                "not a mask.",
                code="MaskNotAllowed",
            )
        return Content(class_index=_class_index(submitted))

    def combine(self, latest: Sequence[Read]) -> CurrentLabel | Disputed:
        """The class most reads chose; a tie for the most reads is disputed."""
        ids = tuple(r.label_id for r in latest)
        classes = [r.class_index for r in latest if r.class_index is not None]
        ranked = Counter(classes).most_common()
        if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
            return Disputed(latest[0].image_id, ids, tuple(classes))
        state: State = "agreed" if len(ranked) == 1 else "majority"
        return CurrentLabel(latest[0].image_id, ranked[0][0], (), ids, state)


def _class_index(submitted: Submission) -> int:
    classes = [str(name) for name in submitted.classes]
    given = submitted.class_index
    if submitted.class_name is not None:
        if submitted.class_name not in classes:
            raise InvalidInput(
                f"Unknown class {submitted.class_name!r}; the project's classes are {classes}.",
                code="InvalidClass",
            )
        index = classes.index(submitted.class_name)
        if given is not None and given != index:
            raise InvalidInput(
                f"class_index {given} and class_name {submitted.class_name!r} disagree; "
                "send one of them.",
                code="InvalidClass",
            )
        return index
    if given is None:
        raise InvalidInput(
            "A classification label needs class_index or class_name.", code="ClassRequired"
        )
    if not 0 <= given < len(classes):
        raise InvalidInput(
            f"class_index {given} is out of range; the project has {len(classes)} "
            f"classes (0..{len(classes) - 1}): {classes}.",
            code="InvalidClass",
        )
    return given
