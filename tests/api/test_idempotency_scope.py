"""Idempotency keys are per author (issue 14, M2): a key used by one user never answers,
nor blocks, another user's request."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Image, Label, Project, Role, User

Headers = dict[str, str]


def _headers(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def test_an_annotator_cannot_squat_the_key_of_an_admin_import(
    client: TestClient,
    db: Session,
    make_user: Callable[..., tuple[User, str]],
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
) -> None:
    project = make_project()
    image = make_image(project)
    _, admin = make_user("admin", Role.admin)
    squatter, annotator = make_user("squatter", Role.annotator)
    # The key the import derives from the content (app.exports.importing).
    digest = hashlib.sha256(b"class:malignant:None").hexdigest()
    key = f"fmt:{project.id}:{image.id}:0:{digest[:32]}"
    squat = {"image_id": image.id, "idempotency_key": key, "class_name": "benign"}
    assert client.post("/labels", json=squat, headers=_headers(annotator)).status_code == 201

    csv = f"image_id,class_name\n{image.id},malignant\n".encode()
    response = client.post(
        f"/projects/{project.id}/import",
        params={"format": "csv"},
        files={"file": ("labels.csv", io.BytesIO(csv))},
        headers=_headers(admin),
    )
    assert response.status_code == 200, response.text
    assert (response.json()["created"], response.json()["unchanged"]) == (1, 0)
    labels = db.scalars(select(Label).where(Label.image_id == image.id).order_by(Label.id)).all()
    assert [(lb.author_name, lb.class_index) for lb in labels] == [
        ("squatter", 0),
        ("admin", 1),
    ]
    assert labels[0].author_id == squatter.id
    # The admin's re-import is the admin's own replay: nothing new.
    again = client.post(
        f"/projects/{project.id}/import",
        params={"format": "csv"},
        files={"file": ("labels.csv", io.BytesIO(csv))},
        headers=_headers(admin),
    )
    assert (again.json()["created"], again.json()["unchanged"]) == (0, 1)


def test_a_key_of_one_user_does_not_answer_another_users_label(
    client: TestClient,
    make_user: Callable[..., tuple[User, str]],
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
) -> None:
    image = make_image(make_project())
    first, first_token = make_user("first")
    second, second_token = make_user("second")
    body = {"image_id": image.id, "idempotency_key": "shared-key", "class_index": 1}
    one = client.post("/labels", json=body, headers=_headers(first_token))
    two = client.post("/labels", json=body, headers=_headers(second_token))
    assert (one.status_code, two.status_code) == (201, 201), two.text
    assert one.json()["id"] != two.json()["id"]
    assert (one.json()["author_id"], two.json()["author_id"]) == (first.id, second.id)
    replay = client.post("/labels", json=body, headers=_headers(second_token))
    assert (replay.status_code, replay.json()["id"]) == (200, two.json()["id"])
