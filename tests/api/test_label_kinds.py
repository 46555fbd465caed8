"""The label-kind registry (``app.labels.kinds``): one module per kind, the one list of kinds.

The last test adds a kind the server has never seen (an ordinal grade whose readers agree on
the median) with nothing but a ``LabelKind`` subclass registered in ``KINDS``, and runs it
through the API: project creation, blind reads, the consensus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.errors import InvalidInput
from app.labels import kinds
from app.labels.consensus import current_labels
from app.labels.kinds import (
    KINDS,
    Content,
    CurrentLabel,
    Disputed,
    LabelKind,
    Read,
    Submission,
    kind_of,
)
from app.models import Image, Project, Role, User


def _submission(**overrides: Any) -> Submission:
    values: dict[str, Any] = {
        "project_id": 1,
        "classes": ["a", "b", "c"],
        "height": 4,
        "width": 5,
        "class_index": None,
        "class_name": None,
        "mask_rle": None,
        "mask_png": None,
    }
    return Submission(**{**values, **overrides})


def test_the_registry_is_the_one_list_of_tasks(client: TestClient, admin_headers: Any) -> None:
    assert sorted(KINDS) == ["classification", "segmentation"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ProjectCreate"]
    assert schema["properties"]["task"]["enum"] == sorted(KINDS)
    body = {"name": "boxes?", "task": "boxes", "classes": ["a", "b"]}
    refused = client.post("/projects", json=body, headers=admin_headers)
    assert refused.status_code == 422 and refused.json()["error"] == "ValidationError"
    with pytest.raises(InvalidInput):
        kind_of("boxes")


def test_each_kind_owns_its_formats_and_defaults() -> None:
    classification, segmentation = KINDS["classification"], KINDS["segmentation"]
    assert (classification.default_alpha, segmentation.default_alpha) == (0.25, 0.5)  # paper
    assert not classification.own_formats & segmentation.own_formats
    assert (classification.ls_control, segmentation.ls_control) == ("Choices", "BrushLabels")
    assert segmentation.checked_classes(None) == ["lesion"]
    with pytest.raises(InvalidInput):
        classification.checked_classes(["a", "A"])


def test_classification_checks_its_content() -> None:
    kind = KINDS["classification"]
    assert kind.content(_submission(class_name="c")) == Content(class_index=2)
    assert kind.content(_submission(class_index=1)) == Content(class_index=1)
    for bad, code in [
        (_submission(), "ClassRequired"),
        (_submission(class_index=3), "InvalidClass"),
        (_submission(class_index=0, class_name="b"), "InvalidClass"),
        (_submission(class_index=0, mask_png=b"png"), "MaskNotAllowed"),
    ]:
        with pytest.raises(InvalidInput) as raised:
            kind.content(bad)
        assert raised.value.code == code


def test_segmentation_checks_its_content() -> None:
    kind = KINDS["segmentation"]
    mask = np.zeros((4, 5), bool)
    assert kind.content(_submission(decoded=mask)).mask is mask
    for bad, code in [
        (_submission(), "MaskRequired"),
        (_submission(class_index=0), "ClassNotAllowed"),
        (_submission(decoded=np.zeros((5, 4), bool)), "MaskSizeMismatch"),
    ]:
        with pytest.raises(InvalidInput) as raised:
            kind.content(bad)
        assert raised.value.code == code


class Grade(LabelKind):
    """A kind the server does not ship: an ordinal grade; readers agree on the median grade,
    and grades more than one step apart go to adjudication."""

    name = "grade"
    default_alpha = 0.25
    ls_control = "Choices"
    own_formats = frozenset()
    takes_class = True

    def checked_classes(self, classes: list[str] | None) -> list[str]:
        if not classes or len(classes) < 3:
            raise InvalidInput("A grade needs at least 3 steps.")
        return classes

    def content(self, submitted: Submission) -> Content:
        return KINDS["classification"].content(submitted)

    def combine(self, latest: Sequence[Read]) -> CurrentLabel | Disputed:
        ids = tuple(r.label_id for r in latest)
        grades = sorted(r.class_index for r in latest if r.class_index is not None)
        if grades[-1] - grades[0] > 1:
            return Disputed(latest[0].image_id, ids, tuple(grades))
        median = grades[(len(grades) - 1) // 2]
        state = "agreed" if grades[0] == grades[-1] else "majority"
        return CurrentLabel(latest[0].image_id, median, (), ids, state)


@pytest.fixture
def grade_kind(monkeypatch: pytest.MonkeyPatch) -> Iterator[LabelKind]:
    kind = Grade()
    monkeypatch.setitem(kinds.KINDS, kind.name, kind)
    yield kind


def test_a_new_kind_is_one_registered_class(
    grade_kind: LabelKind,
    client: TestClient,
    db: Session,
    admin_headers: dict[str, str],
    make_user: Callable[..., tuple[User, str]],
    make_image: Callable[..., Image],
) -> None:
    body = {"name": "severity", "task": "grade", "classes": ["mild", "moderate", "severe"],
            "overlap": 2}  # fmt: skip
    created = client.post("/projects", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    project = db.get_one(Project, created.json()["id"])
    assert project.alpha == grade_kind.default_alpha
    close, apart = make_image(project), make_image(project)
    readers = [make_user(f"reader-{i}", Role.annotator)[1] for i in range(2)]
    for n, (image, grades) in enumerate([(close, (1, 2)), (apart, (0, 2))]):
        for token, grade in zip(readers, grades, strict=True):
            label = {"image_id": image.id, "idempotency_key": f"{n}-{grade}", "class_index": grade}
            sent = client.post("/labels", json=label, headers={"Authorization": f"Bearer {token}"})
            assert sent.status_code == 201, sent.text
    found = current_labels(db, project)
    assert set(found) == {close.id}  # the other waits for a reviewer
    assert (found[close.id].class_index, found[close.id].state) == (1, "majority")
    review = client.get(f"/review?project_id={project.id}&limit=5", headers=admin_headers)
    assert [item["image_id"] for item in review.json()] == [apart.id]
