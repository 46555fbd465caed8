"""Label Studio's ML backend protocol (/ls/*) on SQLite and PostgreSQL, as Label Studio calls it.

Model versions, predictions and queue items are inserted directly (the worker is not under
test); requests carry the bodies Label Studio 1.23 sends (``ml/api_connector.py``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.integrations.labelstudio.rle import decode_mask, encode_mask
from app.integrations.labelstudio.schemas import LsLabelConfig
from app.labels.masks import encode_png_mask
from app.models import (
    Image,
    Label,
    ModelVersion,
    Prediction,
    Project,
    QueueItem,
    Role,
    Round,
    User,
)
from app.storage import Storage
from tests.api.test_queue import add_items, add_round

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

Headers = dict[str, str]
CLASSES = ["benign", "malignant", "other"]
CHOICES_CONFIG = """<View>
  <Image name="img" value="$image"/>
  <Choices name="dx" toName="img" choice="single">
    <Choice value="benign"/><Choice value="malignant"/><Choice value="other"/>
  </Choices>
</View>"""
BRUSH_CONFIG = """<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="seg" toName="img"><Label value="lesion"/></BrushLabels>
</View>"""


def basic(token: str, user: str = "coreloop") -> Headers:
    encoded = base64.b64encode(f"{user}:{token}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


@pytest.fixture
def ls_headers(make_user: Callable[..., tuple[User, str]]) -> Headers:
    """An integration credential, and the members standing for Label Studio users 7 and 9."""
    _, token = make_user("ls-connector", Role.integration)
    make_user("ls:7", Role.annotator)
    make_user("ls:9", Role.annotator)
    return basic(token)


def add_version(
    db: Session,
    project: Project,
    number: int,
    predictions: dict[int, dict[str, Any]] | None = None,
) -> tuple[Round, ModelVersion]:
    """A done round ``number`` with its model version and predictions (image id -> fields)."""
    rnd = add_round(db, project, number)
    version = ModelVersion(
        project_id=project.id, round_id=rnd.id, checkpoint_key=f"ckpt/{rnd.id}", sha256="0" * 64
    )
    db.add(version)
    db.flush()
    for image_id, fields in (predictions or {}).items():
        db.add(Prediction(model_version_id=version.id, image_id=image_id, **fields))
    db.commit()
    return rnd, version


def task(task_id: int, **data: Any) -> dict[str, Any]:
    return {"id": task_id, "data": data, "project": 1}


def setup_body(config: str = CHOICES_CONFIG, **extra: Any) -> dict[str, Any]:
    return {
        "project": "1.1764000000",
        "schema": config,
        "hostname": "http://127.0.0.1:8080",
        "access_token": "ls-token",
        "extra_params": extra or None,
    }


def predict(client: TestClient, headers: Headers, tasks: list[dict[str, Any]], **kw: Any) -> Any:
    body = {"tasks": tasks, "project": "1.1764000000", "label_config": CHOICES_CONFIG, **kw}
    response = client.post("/ls/predict", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["results"]


# -- health, auth, setup ----------------------------------------------------------------------


def test_health_is_open_and_needs_no_data(client: TestClient) -> None:
    for path in ("/ls/health", "/ls/projects/123/health"):
        response = client.get(path)
        assert (response.status_code, response.json()["status"]) == (200, "UP")


def test_auth_basic_bearer_or_open(
    client: TestClient,
    make_project: Callable[..., Project],
    make_user: Callable[..., tuple[User, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_project(classes=CLASSES)
    _, token = make_user("admin-ls", Role.admin)

    def status(headers: Headers) -> int:
        return client.post("/ls/setup", json=setup_body(), headers=headers).status_code

    assert status({}) == 401
    assert status(basic("cl_not-a-token")) == 401
    assert status(basic(token, user="admin")) == 401
    assert status({"Authorization": "Basic !!!"}) == 401
    assert status(basic(token)) == 200
    assert status({"Authorization": f"Bearer {token}"}) == 200
    monkeypatch.setenv("CORELOOP_LS_OPEN", "1")
    assert status({}) == 200


def test_setup_answers_the_newest_model_version(
    client: TestClient, db: Session, make_project: Callable[..., Project], ls_headers: Headers
) -> None:
    project = make_project(classes=CLASSES)

    def version(path: str = "/ls/setup", **extra: Any) -> str:
        response = client.post(path, json=setup_body(**extra), headers=ls_headers)
        assert response.status_code == 200, response.text
        return str(response.json()["model_version"])

    assert version() == f"coreloop-{project.id}-untrained"  # not round 0's name
    add_version(db, project, 0)
    assert version() == f"coreloop-{project.id}-r0"
    add_version(db, project, 1)
    assert version() == f"coreloop-{project.id}-r1"
    assert version(f"/ls/projects/{project.id}/setup") == f"coreloop-{project.id}-r1"
    other = make_project(classes=CLASSES)
    assert version(coreloop_project_id=other.id) == f"coreloop-{other.id}-untrained"
    assert version(coreloop_project_id=str(project.id)) == f"coreloop-{project.id}-r1"


def test_setup_errors_say_what_to_do(
    client: TestClient, make_project: Callable[..., Project], ls_headers: Headers
) -> None:
    project = make_project(classes=CLASSES)
    make_project(classes=CLASSES)

    def error(path: str, body: dict[str, Any]) -> tuple[int, str]:
        response = client.post(path, json=body, headers=ls_headers)
        return response.status_code, response.json()["error"]

    assert error("/ls/setup", setup_body()) == (422, "ProjectUnresolved")
    assert error("/ls/projects/999999/setup", setup_body()) == (404, "ProjectNotFound")
    path = f"/ls/projects/{project.id}/setup"
    assert error(path, setup_body(BRUSH_CONFIG)) == (422, "LabelConfigMismatch")
    two_classes = CHOICES_CONFIG.replace('<Choice value="other"/>', "")
    assert error(path, setup_body(two_classes)) == (422, "LabelConfigMismatch")
    segmentation = make_project(task="segmentation", classes=["lesion"])
    path = f"/ls/projects/{segmentation.id}/setup"
    assert error(path, setup_body(CHOICES_CONFIG)) == (422, "LabelConfigMismatch")
    assert client.post(path, json=setup_body(BRUSH_CONFIG), headers=ls_headers).status_code == 200


# -- predict ----------------------------------------------------------------------------------


def test_predict_classification_in_task_order(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES)
    images = [make_image(project) for _ in range(5)]
    outputs = [([0.7, 0.2, 0.1], 0.5), ([0.1, 0.8, 0.1], 0.1), ([0.2, 0.3, 0.5], 3.0)]
    outputs.append(([0.3, 0.3, 0.4], 1.0))
    probs = {
        images[i].id: {"class_probs": p, "predicted_loss": loss}
        for i, (p, loss) in enumerate(outputs)
    }
    rnd, _ = add_version(db, project, 0, probs)
    add_items(db, project, rnd, [images[2], images[0]])  # the batch: images[2] first
    tasks = [
        task(11, image=f"http://127.0.0.1:8000/images/{images[0].id}/file"),
        task(12, image=f"/images/{images[1].id}/file"),
        task(13, image="/data/upload/1/lesion.png"),
        task(14, image="http://elsewhere/x.png", coreloop_image_id=images[2].id),
        task(15, image=f"/images/{images[3].id}/file"),
        task(16, image=f"/images/{images[4].id}/file"),  # no prediction
    ]
    results = predict(client, ls_headers, tasks)

    version = f"coreloop-{project.id}-r0"
    assert [r["model_version"] for r in results] == [version] * 6
    picked = [r["result"][0]["value"]["choices"][0] if r["result"] else None for r in results]
    assert picked == ["benign", "malignant", None, "other", "other", None]
    region = results[0]["result"][0]
    assert (region["from_name"], region["to_name"], region["type"]) == ("dx", "img", "choices")
    scores = [r["score"] for r in results]
    assert scores[3] == 0.0 and scores[0] == 0.25  # 0.5 * rank / batch size: pick order first
    assert scores[1] == pytest.approx(0.5 + 0.5 / 1.1)  # the rest: 0.5 + 0.5 / (1 + loss)
    assert scores[4] == pytest.approx(0.5 + 0.5 / 2.0)
    assert scores[2] == scores[5] == 1.0  # no coreloop image / no prediction: last
    assert sorted(range(6), key=scores.__getitem__) == [3, 0, 4, 1, 2, 5]
    assert all(0.0 <= score <= 1.0 for score in scores)  # Label Studio refuses others


def test_predict_uses_the_newest_version_and_skips_labeled_batch_items(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES)
    image = make_image(project)
    add_version(db, project, 0, {image.id: {"class_probs": [0.9, 0.05, 0.05]}})
    rnd, _ = add_version(db, project, 1, {image.id: {"class_probs": [0.1, 0.1, 0.8]}})
    (item,) = add_items(db, project, rnd, [image])
    item.labels_needed = 0  # fully labeled: no longer ahead in the queue
    db.commit()

    (result,) = predict(client, ls_headers, [task(1, image=f"/images/{image.id}/file")])
    assert result["model_version"] == f"coreloop-{project.id}-r1"
    assert result["result"][0]["value"]["choices"] == ["other"]
    assert result["score"] == pytest.approx(0.9)  # 0.5 + 0.5 * top probability without a loss


def test_predict_under_a_project_path_keeps_to_that_project(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    mine, other = make_project(classes=CLASSES), make_project(classes=CLASSES)
    a, b = make_image(mine), make_image(other)
    add_version(db, mine, 2, {a.id: {"class_probs": [0.1, 0.9, 0.0]}})
    add_version(db, other, 0, {b.id: {"class_probs": [0.1, 0.9, 0.0]}})
    body = {
        "tasks": [task(1, image=f"/images/{a.id}/file"), task(2, image=f"/images/{b.id}/file")],
        "label_config": CHOICES_CONFIG,
    }
    response = client.post(f"/ls/projects/{mine.id}/predict", json=body, headers=ls_headers)
    first, second = response.json()["results"]
    assert first["result"] and not second["result"]
    assert first["model_version"] == second["model_version"] == f"coreloop-{mine.id}-r2"


def _disc(height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return np.asarray((yy - height / 2) ** 2 + (xx - width / 3) ** 2 <= 40)


def test_predict_segmentation_as_label_studio_brush_rle(
    client: TestClient,
    db: Session,
    storage: Storage,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project = make_project(task="segmentation", classes=["lesion"])
    image, empty = make_image(project, width=32, height=24), make_image(project)
    mask = _disc(24, 32)
    storage.put_bytes("masks/p/pred.png", encode_png_mask(mask))
    storage.put_bytes("masks/p/empty.png", encode_png_mask(np.zeros((24, 32), dtype=bool)))
    add_version(
        db,
        project,
        0,
        {
            image.id: {"mask_key": "masks/p/pred.png", "predicted_loss": 0.25},
            empty.id: {"mask_key": "masks/p/empty.png"},
        },
    )
    tasks = [task(1, image=f"/images/{image.id}/file"), task(2, image=f"/images/{empty.id}/file")]
    results = predict(client, ls_headers, tasks, label_config=BRUSH_CONFIG)

    (region,) = results[0]["result"]
    assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "seg", "img")
    assert (region["original_width"], region["original_height"]) == (32, 24)
    assert region["value"]["format"] == "rle" and region["value"]["brushlabels"] == ["lesion"]
    assert (decode_mask(region["value"]["rle"], 32, 24) == mask).all()
    assert results[0]["score"] == pytest.approx(0.5 + 0.5 / 1.25)
    assert results[1]["result"] == []


# -- webhook ----------------------------------------------------------------------------------


def annotation_event(
    image_id: int | None,
    result: list[dict[str, Any]],
    *,
    annotation_id: int = 501,
    updated_at: str = "2026-11-26T10:00:00.000000Z",
    action: str = "ANNOTATION_CREATED",
    completed_by: Any = 7,
    **fields: Any,
) -> dict[str, Any]:
    data = {"image": f"/images/{image_id}/file"} if image_id else {"image": "/data/upload/x.png"}
    data = fields.pop("task_data", data)
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": result,
            "completed_by": completed_by,
            "created_at": "2026-11-26T09:59:00.000000Z",
            "updated_at": updated_at,
            "task": 31,
            "was_cancelled": False,
            **fields,
        },
        "task": {"id": 31, "data": data, "project": 1},
        "project": {"id": 1, "title": "ls"},
    }


def choice(name: str) -> list[dict[str, Any]]:
    return [{"from_name": "dx", "to_name": "img", "type": "choices", "value": {"choices": [name]}}]


def _labels(db: Session, image_id: int) -> list[Label]:
    db.expire_all()
    return list(db.scalars(select(Label).where(Label.image_id == image_id).order_by(Label.id)))


def test_webhook_annotation_becomes_a_label_once(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES)
    image = make_image(project)
    (item,) = add_items(db, project, add_round(db, project, 0), [image])
    event = annotation_event(image.id, choice("malignant"))

    first = client.post("/ls/webhook", json=event, headers=ls_headers)
    again = client.post("/ls/webhook", json=event, headers=ls_headers)
    assert (first.status_code, first.json()["status"]) == (200, "recorded")
    assert (again.json()["status"], again.json()["label_id"]) == (
        "replayed",
        first.json()["label_id"],
    )

    updated = annotation_event(
        image.id, choice("other"), action="ANNOTATION_UPDATED", updated_at="2026-11-26T11:00:00Z"
    )
    assert (
        client.post("/ls/webhook", json=updated, headers=ls_headers).json()["status"] == "recorded"
    )
    labels = _labels(db, image.id)
    assert [(lb.class_index, lb.source, lb.author_name) for lb in labels] == [
        (1, "label-studio", "ls:7"),
        (2, "label-studio", "ls:7"),
    ]
    assert db.scalar(select(func.count()).select_from(User).where(User.name == "ls:7")) == 1
    db.refresh(item)
    assert item.labels_needed == 0  # counted once per author
    history = client.get(f"/images/{image.id}/labels", headers=annotator_headers).json()
    assert [h["class_name"] for h in history] == ["other", "malignant"]


def test_webhook_reads_the_class_beside_other_controls(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    image = make_image(make_project(classes=CLASSES))
    quality = {"from_name": "quality", "to_name": "img", "type": "choices"}
    result = [{**quality, "value": {"choices": ["blurry"]}}, *choice("malignant")]
    event = annotation_event(image.id, result, task_data={"coreloop_image_id": str(image.id)})
    assert client.post("/ls/webhook", json=event, headers=ls_headers).json()["status"] == "recorded"
    assert [label.class_index for label in _labels(db, image.id)] == [1]


def test_label_config_parsing() -> None:
    config = LsLabelConfig.parse(
        '<View><Text name="t" value="$text"/><Image name="img" value="$photo"/>'
        '<Choices name="dx" toName="t,img"><Choice value="a"/><Choice value="b"/></Choices>'
        "</View>"
    )
    assert config.images == {"img": "photo"}
    control = config.control("Choices")
    assert control is not None and (control.to_name, control.values) == ("img", ("a", "b"))
    assert config.mismatch("Choices", ["a", "b"]) is None
    assert "lacks the classes ['c']" in (config.mismatch("Choices", ["a", "c"]) or "")
    assert "<BrushLabels>" in (config.mismatch("BrushLabels", ["lesion"]) or "")
    assert LsLabelConfig.parse("<View><unclosed></View>").controls == ()


def test_webhook_ignores_what_is_not_a_coreloop_annotation(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES)
    image = make_image(project)
    events = [
        {"action": "PROJECT_UPDATED", "project": {"id": 1}},
        {"action": "TASKS_CREATED", "tasks": [{"id": 1}]},
        annotation_event(None, choice("benign")),  # a Label Studio upload
        annotation_event(image.id, choice("benign"), was_cancelled=True),
        annotation_event(image.id, []),  # nothing picked
    ]
    for event in events:
        response = client.post("/ls/webhook", json=event, headers=ls_headers)
        assert (response.status_code, response.json()["status"]) == (200, "ignored")
    assert _labels(db, image.id) == []


def test_webhook_refuses_bad_annotations(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    image = make_image(make_project(classes=CLASSES))
    unknown = client.post(
        "/ls/webhook", json=annotation_event(image.id, choice("nevus")), headers=ls_headers
    )
    assert (unknown.status_code, unknown.json()["error"]) == (422, "InvalidClass")
    several = [{**choice("benign")[0], "value": {"choices": ["benign", "other"]}}]
    response = client.post(
        "/ls/webhook", json=annotation_event(image.id, several), headers=ls_headers
    )
    assert (response.status_code, response.json()["error"]) == (422, "InvalidClass")
    shapeless = {"action": "ANNOTATION_CREATED", "annotation": {"result": []}}
    assert client.post("/ls/webhook", json=shapeless, headers=ls_headers).status_code == 422
    assert (
        client.post("/ls/webhook", json=annotation_event(image.id, choice("benign"))).status_code
        == 401
    )


def test_webhook_brush_annotation_is_stored_after_the_answer(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
    annotator_headers: Headers,
) -> None:
    project = make_project(task="segmentation", classes=["lesion"])
    image = make_image(project, width=32, height=24)
    mask = _disc(24, 32)
    region = {
        "from_name": "seg",
        "to_name": "img",
        "type": "brushlabels",
        "original_width": 32,
        "original_height": 24,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": ["lesion"]},
    }
    response = client.post(
        "/ls/webhook", json=annotation_event(image.id, [region]), headers=ls_headers
    )
    assert (
        response.json()["status"] == "queued"
    )  # TestClient runs the background task before returning
    (label,) = _labels(db, image.id)
    assert (label.source, label.author_name) == ("label-studio", "ls:7")
    png = client.get(f"/labels/{label.id}/mask", headers=annotator_headers).content
    assert ((np.asarray(PILImage.open(io.BytesIO(png))) > 0) == mask).all()

    wrong_size = {**region, "original_width": 30}
    event = annotation_event(image.id, [wrong_size], annotation_id=502)
    assert client.post("/ls/webhook", json=event, headers=ls_headers).json()["status"] == "queued"
    assert len(_labels(db, image.id)) == 1  # refused in the background (logged)


def test_webhook_labels_count_towards_auto_rounds(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES, auto_round="every_n", auto_round_every=2)
    images = [make_image(project) for _ in range(2)]
    for n, image in enumerate(images):
        event = annotation_event(image.id, choice("benign"), annotation_id=600 + n)
        assert client.post("/ls/webhook", json=event, headers=ls_headers).status_code == 200
    db.expire_all()
    rounds = db.scalars(select(Round.status).where(Round.project_id == project.id)).all()
    assert list(rounds) == ["queued"]


def test_webhook_under_a_project_path(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    project, other = make_project(classes=CLASSES), make_project(classes=CLASSES)
    image, elsewhere = make_image(project), make_image(other)
    path = f"/ls/projects/{project.id}/webhook"
    event = annotation_event(image.id, choice("other"), completed_by=9)
    assert client.post(path, json=event, headers=ls_headers).json()["status"] == "recorded"
    assert [(lb.class_index, lb.author_name) for lb in _labels(db, image.id)] == [(2, "ls:9")]
    event = annotation_event(elsewhere.id, choice("other"), annotation_id=777)
    assert client.post(path, json=event, headers=ls_headers).json()["status"] == "ignored"
    assert _labels(db, elsewhere.id) == []


# -- who may speak for Label Studio's users (issue 14, M3) -------------------------------------


def test_webhook_takes_only_an_integration_credential(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    ls_headers: Headers,
) -> None:
    image = make_image(make_project(classes=CLASSES))
    event = annotation_event(image.id, choice("benign"))
    for role in (Role.annotator, Role.admin):
        _, token = make_user(f"not-an-integration-{role}", role)
        for headers in (basic(token), {"Authorization": f"Bearer {token}"}):
            response = client.post("/ls/webhook", json=event, headers=headers)
            assert (response.status_code, response.json()["error"]) == (
                403,
                "IntegrationRequired",
            )
    assert _labels(db, image.id) == []
    # The integration credential works on /ls/* only.
    token = base64.b64decode(ls_headers["Authorization"].split()[1]).decode().split(":", 1)[1]
    me = client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
    assert (me.status_code, me.json()["error"]) == (403, "IntegrationOnly")
    assert client.post("/ls/webhook", json=event, headers=ls_headers).status_code == 200


def test_webhook_maps_label_studio_users_to_existing_members_only(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    ls_headers: Headers,
) -> None:
    project = make_project(classes=CLASSES, overlap=2)
    image = make_image(project)
    (item,) = add_items(db, project, add_round(db, project, 0), [image])
    users_before = db.scalar(select(func.count()).select_from(User))
    made_up = [
        ("someone-else@example.com", {"id": 8, "email": "someone-else@example.com"}),
        ("8", 8),
        ("ls-connector", {"email": "ls-connector"}),  # the integration user is no member
    ]
    for n, (who, completed_by) in enumerate(made_up):
        event = annotation_event(
            image.id, choice("benign"), annotation_id=900 + n, completed_by=completed_by
        )
        response = client.post("/ls/webhook", json=event, headers=ls_headers)
        assert (response.status_code, response.json()["error"]) == (
            422,
            "UnknownLabelStudioUser",
        ), who
        assert who in response.json()["detail"]
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(User)) == users_before
    assert _labels(db, image.id) == []
    assert db.scalar(select(QueueItem.labels_needed).where(QueueItem.id == item.id)) == 2

    # A member by e-mail: the label is theirs.
    reader, _ = make_user("reader@example.com", Role.annotator)
    event = annotation_event(
        image.id, choice("other"), annotation_id=950, completed_by={"id": 3, "email": reader.name}
    )
    assert client.post("/ls/webhook", json=event, headers=ls_headers).json()["status"] == "recorded"
    assert [(lb.author_id, lb.class_index) for lb in _labels(db, image.id)] == [(reader.id, 2)]


def test_brush_annotation_of_an_unknown_user_is_refused_in_the_answer(
    client: TestClient,
    db: Session,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    ls_headers: Headers,
) -> None:
    image = make_image(make_project(task="segmentation", classes=["lesion"]), width=32, height=24)
    region = {
        "from_name": "seg",
        "to_name": "img",
        "type": "brushlabels",
        "original_width": 32,
        "original_height": 24,
        "value": {"format": "rle", "rle": encode_mask(_disc(24, 32)), "brushlabels": ["lesion"]},
    }
    event = annotation_event(image.id, [region], completed_by=12345)
    response = client.post("/ls/webhook", json=event, headers=ls_headers)
    assert (response.status_code, response.json()["error"]) == (422, "UnknownLabelStudioUser")
    assert _labels(db, image.id) == []
