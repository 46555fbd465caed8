"""Project membership and blind reads (issue 15), on SQLite and PostgreSQL.

Annotators and reviewers reach only the projects they are members of; a non-member is answered
404 on every route of the project. With ``overlap`` >= 2 (several reads per image) an annotator
sees only their own labels and masks; reviewers and admins see every read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.labels.masks import mask_to_rle
from app.models import (
    Image,
    Label,
    MemberRole,
    ModelVersion,
    Prediction,
    Project,
    ProjectMember,
    Role,
    User,
)
from tests.api.test_queue import add_items, add_round

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Headers = dict[str, str]


def _headers(token: str) -> Headers:
    return {"Authorization": f"Bearer {token}"}


def _error(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]


# -- managing members --------------------------------------------------------------------------


def test_admin_adds_lists_and_removes_members(
    client: TestClient,
    admin_headers: Headers,
    make_user: Callable[..., tuple[User, str]],
    make_project: Callable[..., Project],
) -> None:
    project = make_project(members=False)
    annotator, _ = make_user("ann", Role.annotator, member=False)
    reviewer, _ = make_user("rev", Role.reviewer, member=False)
    url = f"/projects/{project.id}/members"
    added = client.post(url, json={"user_id": annotator.id}, headers=admin_headers)
    assert added.status_code == 201, added.text
    assert added.json()["role"] == "annotator"
    # The default role is the user's own when it is a member role.
    added = client.post(url, json={"user_id": reviewer.id}, headers=admin_headers)
    assert added.json()["role"] == "reviewer"
    listed = client.get(url, headers=admin_headers).json()
    assert [(m["name"], m["role"]) for m in listed] == [("ann", "annotator"), ("rev", "reviewer")]
    again = client.post(url, json={"user_id": annotator.id}, headers=admin_headers)
    assert _error(again) == (409, "MemberExists")
    removed = client.delete(f"{url}/{annotator.id}", headers=admin_headers)
    assert removed.status_code == 204
    assert _error(client.delete(f"{url}/{annotator.id}", headers=admin_headers)) == (
        404,
        "MemberNotFound",
    )
    assert [m["name"] for m in client.get(url, headers=admin_headers).json()] == ["rev"]


def test_member_refusals(
    client: TestClient,
    admin_headers: Headers,
    make_user: Callable[..., tuple[User, str]],
    make_project: Callable[..., Project],
) -> None:
    project = make_project(members=False)
    admin, _ = make_user("another-admin", Role.admin)
    integration, _ = make_user("ls", Role.integration)
    annotator, token = make_user("ann", Role.annotator, member=False)
    url = f"/projects/{project.id}/members"
    for user in (admin, integration):
        refused = client.post(url, json={"user_id": user.id}, headers=admin_headers)
        assert _error(refused) == (422, "InvalidMember")
    assert _error(client.post(url, json={"user_id": 9999}, headers=admin_headers)) == (
        404,
        "UserNotFound",
    )
    bad_role = client.post(
        url, json={"user_id": annotator.id, "role": "admin"}, headers=admin_headers
    )
    assert bad_role.status_code == 422
    missing = client.post(
        "/projects/9999/members", json={"user_id": annotator.id}, headers=admin_headers
    )
    assert _error(missing) == (404, "ProjectNotFound")
    # Only admins manage members.
    assert client.get(url, headers=_headers(token)).status_code == 403
    assert (
        client.post(url, json={"user_id": annotator.id}, headers=_headers(token)).status_code == 403
    )


def test_users_can_be_created_as_reviewers(client: TestClient, admin_headers: Headers) -> None:
    created = client.post(
        "/users", json={"name": "dr-r", "role": "reviewer"}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "reviewer"


# -- non-members -------------------------------------------------------------------------------


@pytest.fixture
def seeded(
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> dict[str, Any]:
    """A segmentation project nobody is a member of, with an image, a round, a queue item, a
    model version, a prediction with a mask, and a label with a mask by an admin."""
    project = make_project(members=False, task="segmentation", classes=["lesion"])
    image = make_image(project)
    rnd = add_round(db, project)
    add_items(db, project, rnd, [image])
    version = ModelVersion(
        project_id=project.id, round_id=rnd.id, checkpoint_key="models/x.pt", sha256="0" * 64
    )
    db.add(version)
    db.flush()
    db.add(
        Prediction(model_version_id=version.id, image_id=image.id, mask_key=f"masks/{project.id}/p")
    )
    admin, admin_token = make_user("boss", Role.admin)
    db.commit()
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[2:8, 3:9] = True
    return {
        "project": project,
        "image": image,
        "round": rnd,
        "version": version,
        "prediction": db.scalar(select(Prediction.id).where(Prediction.image_id == image.id)),
        "admin": _headers(admin_token),
        "mask_rle": mask_to_rle(mask),
    }


def _project_routes(s: dict[str, Any], label_id: int) -> list[tuple[str, str, dict[str, Any]]]:
    pid, iid = s["project"].id, s["image"].id
    return [
        ("GET", f"/projects/{pid}", {}),
        ("GET", f"/projects/{pid}/images", {}),
        ("GET", f"/images/{iid}", {}),
        ("GET", f"/images/{iid}/file", {}),
        ("GET", f"/images/{iid}/labels", {}),
        ("GET", f"/labels/{label_id}", {}),
        ("GET", f"/labels/{label_id}/mask", {}),
        ("GET", "/queue", {"params": {"project_id": pid}}),
        ("GET", "/rounds", {"params": {"project_id": pid}}),
        ("GET", f"/rounds/{s['round'].id}", {}),
        ("GET", f"/projects/{pid}/models", {}),
        ("GET", f"/models/{s['version'].id}", {}),
        ("GET", f"/predictions/{s['prediction']}/mask", {}),
        ("GET", f"/projects/{pid}/warm-start", {}),
        ("GET", f"/projects/{pid}/agreement", {}),
        ("GET", "/review", {"params": {"project_id": pid}}),
        (
            "POST",
            "/labels",
            {"json": {"image_id": iid, "idempotency_key": "k-1", "mask_rle": s["mask_rle"]}},
        ),
        ("POST", "/activelearning/confident_coreset", {"json": {"project_id": pid}}),
        ("POST", f"/ls/projects/{pid}/setup", {"json": {"project": "1", "schema": ""}}),
        (
            "POST",
            f"/ls/projects/{pid}/predict",
            {"json": {"tasks": [{"id": 1, "data": {"image": f"/images/{iid}/file"}}],
                      "label_config": "<View></View>"}},
        ),
    ]  # fmt: skip


def _admin_label(client: TestClient, s: dict[str, Any]) -> int:
    body = {"image_id": s["image"].id, "idempotency_key": "admin-1", "mask_rle": s["mask_rle"]}
    response = client.post("/labels", json=body, headers=s["admin"])
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_non_members_get_404_on_every_route_of_the_project(
    client: TestClient,
    seeded: dict[str, Any],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    label_id = _admin_label(client, seeded)
    outsiders = [
        make_user("outsider", Role.annotator, member=False)[1],
        make_user("outside-reviewer", Role.reviewer, member=False)[1],
    ]
    for token in outsiders:
        listed = client.get("/projects", headers=_headers(token)).json()
        assert seeded["project"].id not in [p["id"] for p in listed]
        for method, path, kwargs in _project_routes(seeded, label_id):
            response = client.request(method, path, headers=_headers(token), **kwargs)
            assert response.status_code == 404, (method, path, response.text)
    # The same routes answer the admin (the /ls ones and the label post aside: they need more).
    for method, path, kwargs in _project_routes(seeded, label_id)[:16]:
        if path.endswith("/warm-start") or "/predictions/" in path or path.endswith("/file"):
            continue  # no warm start, no stored files for these seeded rows
        response = client.request(method, path, headers=seeded["admin"], **kwargs)
        assert response.status_code == 200, (method, path, response.text)


def test_a_member_reaches_the_project_until_removed(
    client: TestClient,
    db: Session,
    seeded: dict[str, Any],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    user, token = make_user("joiner", Role.annotator, member=False)
    pid = seeded["project"].id
    url = f"/projects/{pid}/members"
    assert client.post(url, json={"user_id": user.id}, headers=seeded["admin"]).status_code == 201
    assert pid in [p["id"] for p in client.get("/projects", headers=_headers(token)).json()]
    queue = client.get("/queue", params={"project_id": pid}, headers=_headers(token))
    assert queue.status_code == 200 and len(queue.json()) == 1
    lease_id = queue.json()[0]["lease_id"]
    assert client.delete(f"{url}/{user.id}", headers=seeded["admin"]).status_code == 204
    assert client.get(f"/projects/{pid}", headers=_headers(token)).status_code == 404
    # A removed member's lease is over for them too.
    assert client.post(f"/leases/{lease_id}/renew", headers=_headers(token)).status_code == 404
    body = {"image_id": seeded["image"].id, "idempotency_key": "late", "lease_id": lease_id,
            "mask_rle": seeded["mask_rle"]}  # fmt: skip
    assert _error(client.post("/labels", json=body, headers=_headers(token))) == (
        404,
        "ImageNotFound",
    )
    assert db.scalar(select(Label.id).where(Label.author_id == user.id)) is None


def test_reviewers_read_but_do_not_take_reads(
    client: TestClient,
    seeded: dict[str, Any],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    _, token = make_user("dr-review", Role.reviewer)  # a member (as reviewer) of every project
    pid = seeded["project"].id
    assert client.get(f"/projects/{pid}", headers=_headers(token)).status_code == 200
    queue = client.get("/queue", params={"project_id": pid}, headers=_headers(token))
    assert _error(queue) == (422, "ReviewerCannotAnnotate")
    body = {"image_id": seeded["image"].id, "idempotency_key": "r-1",
            "mask_rle": seeded["mask_rle"]}  # fmt: skip
    assert _error(client.post("/labels", json=body, headers=_headers(token))) == (
        422,
        "ReviewerCannotAnnotate",
    )


# -- blind reads -------------------------------------------------------------------------------


def _label(client: TestClient, token: str, image: Image, key: str, class_index: int) -> int:
    body = {"image_id": image.id, "idempotency_key": key, "class_index": class_index}
    response = client.post("/labels", json=body, headers=_headers(token))
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.mark.parametrize("overlap", [2, 1])
def test_blind_reads_with_several_readers(
    client: TestClient,
    admin_headers: Headers,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    overlap: int,
) -> None:
    project = make_project(overlap=overlap)
    image = make_image(project)
    _, token_a = make_user("reader-a")
    _, token_b = make_user("reader-b")
    _, token_r = make_user("reviewer-r", Role.reviewer)
    mine = _label(client, token_a, image, "a-1", 0)
    theirs = _label(client, token_b, image, "b-1", 1)
    history = client.get(f"/images/{image.id}/labels", headers=_headers(token_a)).json()
    current = client.get(f"/images/{image.id}", headers=_headers(token_a)).json()["label"]
    other = client.get(f"/labels/{theirs}", headers=_headers(token_a))
    if overlap >= 2:
        assert [entry["id"] for entry in history] == [mine]
        assert current["id"] == mine
        assert _error(other) == (404, "LabelNotFound")
    else:
        assert [entry["id"] for entry in history] == [theirs, mine]
        assert current["id"] == theirs
        assert other.status_code == 200
    assert client.get(f"/labels/{mine}", headers=_headers(token_a)).status_code == 200
    # Reviewers and admins see every read.
    for headers in (_headers(token_r), admin_headers):
        seen = client.get(f"/images/{image.id}/labels", headers=headers).json()
        assert [entry["id"] for entry in seen] == [theirs, mine]
        assert client.get(f"/labels/{theirs}", headers=headers).status_code == 200


def test_blind_masks(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2, task="segmentation", classes=["lesion"])
    image = make_image(project)
    _, token_a = make_user("masker-a")
    _, token_b = make_user("masker-b")
    mask = np.zeros((image.height, image.width), dtype=bool)
    mask[1:5, 1:5] = True
    body = {"image_id": image.id, "idempotency_key": "m-b", "mask_rle": mask_to_rle(mask)}
    theirs = client.post("/labels", json=body, headers=_headers(token_b)).json()["id"]
    refused = client.get(f"/labels/{theirs}/mask", headers=_headers(token_a))
    assert _error(refused) == (404, "LabelNotFound")
    assert client.get(f"/labels/{theirs}/mask", headers=_headers(token_b)).status_code == 200


def test_membership_rows_follow_users_and_projects(
    db: Session,
    make_project: Callable[..., Project],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    """The test fixtures' default (every annotator and reviewer a member of every project)
    keeps each member's own role."""
    project = make_project()
    annotator, _ = make_user("plain")
    reviewer, _ = make_user("checker", Role.reviewer)
    rows = db.execute(
        select(ProjectMember.user_id, ProjectMember.role).where(
            ProjectMember.project_id == project.id
        )
    ).all()
    roles = {user_id: role for user_id, role in rows}
    assert roles == {annotator.id: MemberRole.annotator, reviewer.id: MemberRole.reviewer}
