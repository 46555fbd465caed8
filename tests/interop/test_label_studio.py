"""coreloop as the ML backend of a real Label Studio 1.23.2, driven with label-studio-sdk 2.1.2.

Coreloop's rows (a project, images, a model version with predictions, a queue batch) are
inserted directly; Label Studio gets tasks pointing at coreloop's ``/images/{id}/file`` URLs,
connects coreloop as its ML backend (basic auth: ``coreloop`` + an API token), retrieves
predictions, and its annotations come back to coreloop as labels through the webhook.
"""

from __future__ import annotations

import base64
import io
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import unit_of_work
from app.integrations.labelstudio.rle import decode_mask, encode_mask
from app.labels.masks import encode_png_mask
from app.models import Image, ModelVersion, Prediction, Project, QueueItem, Round
from tests.interop.conftest import CoreloopServer, LabelStudioServer, LsDriver, wait_until

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

CLASSES = ["benign", "malignant", "other"]
CHOICES_CONFIG = """<View>
  <Image name="img" value="$image"/>
  <Choices name="dx" toName="img" choice="single">
    <Choice value="benign"/><Choice value="malignant"/><Choice value="other"/>
  </Choices>
</View>"""
BRUSH_CONFIG = """<View>
  <Image name="img" value="$image"/>
  <BrushLabels name="seg" toName="img"><Label value="lesion" background="red"/></BrushLabels>
</View>"""
H, W = 24, 32


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return np.asarray((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


def _images(core: CoreloopServer, session: Session, project_id: int, n: int) -> list[Image]:
    images = []
    for i in range(n):
        key = f"images/{project_id}/{uuid.uuid4().hex}.png"
        image = Image(
            project_id=project_id,
            sha256=core.storage.put_bytes(key, _png(i)),
            storage_key=key,
            filename=f"{i}.png",
            content_type="image/png",
            width=W,
            height=H,
            split="pool",
            meta={},
        )
        session.add(image)
        images.append(image)
    session.flush()
    return images


def seed(
    core: CoreloopServer, task: str, classes: list[str], outputs: list[dict[str, Any]]
) -> tuple[int, list[int]]:
    """A project with one image per output, round 0 done, its model version and predictions."""
    with unit_of_work(core.sessions) as session:
        name = f"interop-{uuid.uuid4().hex[:6]}"
        project = Project(name=name, task=task, classes=classes, budget_count=2, alpha=0.25)
        session.add(project)
        session.flush()
        images = _images(core, session, project.id, len(outputs))
        rnd = Round(
            project_id=project.id,
            number=0,
            status="done",
            strategy="confident_coreset",
            alpha=0.25,
            budget=2,
            progress={},
            metrics={},
        )
        session.add(rnd)
        session.flush()
        version = ModelVersion(
            project_id=project.id, round_id=rnd.id, checkpoint_key="ckpt/0", sha256="0" * 64
        )
        session.add(version)
        session.flush()
        for image, output in zip(images, outputs, strict=True):
            session.add(Prediction(model_version_id=version.id, image_id=image.id, **output))
        return project.id, [image.id for image in images]


def add_batch(core: CoreloopServer, project_id: int, image_ids: list[int]) -> None:
    """Round 0's queue: ``image_ids`` in pick order."""
    with unit_of_work(core.sessions) as session:
        round_id = session.scalar(select(Round.id).where(Round.project_id == project_id))
        assert round_id is not None
        session.add_all(
            QueueItem(
                project_id=project_id,
                image_id=image_id,
                round_id=round_id,
                rank=rank,
                labels_needed=1,
            )
            for rank, image_id in enumerate(image_ids)
        )


def connect(ls: LabelStudioServer, core: CoreloopServer, project: int, url: str, **kw: Any) -> None:
    """The webhook first, with our basic auth (so Label Studio keeps it), then the backend;
    with the integration credential (the only one /ls/webhook takes), and the Label Studio
    user as a coreloop member (the webhook records only members' annotations)."""
    core.add_member(f"ls:{ls.sdk('whoami')}")
    auth = base64.b64encode(f"coreloop:{core.integration_token}".encode()).decode()
    ls.sdk(
        "create_webhook",
        project=project,
        url=f"{url}/webhook",
        headers={"Authorization": f"Basic {auth}"},
    )
    state = ls.sdk(
        "connect_ml",
        project=project,
        url=url,
        user="coreloop",
        password=core.integration_token,
        **kw,
    )
    assert state == "CO"  # connected: /health and /setup answered
    (hook,) = ls.sdk("webhooks", project=project)
    assert hook["url"] == f"{url}/webhook" and hook["headers"]["Authorization"].startswith("Basic")


def labels_of(core: CoreloopServer, image_id: int, count: int) -> list[dict[str, Any]]:
    """Poll coreloop until the image has ``count`` labels (newest first)."""

    def arrived() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = core.get(f"/images/{image_id}/labels")
        return found if len(found) >= count else None

    result: list[dict[str, Any]] = wait_until(arrived, 30, f"{count} label(s) of image {image_id}")
    return result


@pytest.mark.slow
def test_classification_predictions_and_annotations(
    label_studio: LabelStudioServer, coreloop: CoreloopServer
) -> None:
    outputs = [
        {"class_probs": [0.7, 0.2, 0.1], "predicted_loss": 0.5},
        {"class_probs": [0.1, 0.8, 0.1], "predicted_loss": 0.1},
        {"class_probs": [0.2, 0.3, 0.5], "predicted_loss": 3.0},
    ]
    project_id, images = seed(coreloop, "classification", CLASSES, outputs)
    seed(coreloop, "classification", CLASSES, [])  # a second project: /ls alone is ambiguous
    add_batch(coreloop, project_id, [images[2], images[0]])
    ls = label_studio
    ls_project = ls.sdk("create_project", title="coreloop", label_config=CHOICES_CONFIG)
    data = [{"image": f"{coreloop.url}/images/{images[0]}/file"}]
    data += [{"image": f"{coreloop.url}/images/{images[1]}/file"}]
    data += [{"image": "http://127.0.0.1:9/elsewhere.png", "coreloop_image_id": images[2]}]
    data += [{"image": "/data/upload/1/not-in-coreloop.png"}]
    tasks = ls.sdk("import_tasks", project=ls_project, tasks=[{"data": d} for d in data])
    connect(
        ls,
        coreloop,
        ls_project,
        f"{coreloop.url}/ls",
        extra_params={"coreloop_project_id": project_id},
    )

    for _ in range(2):  # a second retrieval adds nothing: the model version is unchanged
        ls.sdk("retrieve_predictions", project=ls_project, tasks=tasks)
    stored = [ls.sdk("predictions", task=task_id) for task_id in tasks]
    assert [len(p) for p in stored] == [1, 1, 1, 1]
    first = [p[0] for p in stored]
    assert {p["model_version"] for p in first} == {f"coreloop-{project_id}-r0"}
    picked = [p["result"][0]["value"]["choices"] if p["result"] else None for p in first]
    assert picked == [["benign"], ["malignant"], ["other"], None]
    scores = [p["score"] for p in first]
    assert scores == pytest.approx([0.25, 0.5 + 0.5 / 1.1, 0.0, 1.0])

    me = ls.sdk("whoami")
    choice = [
        {"from_name": "dx", "to_name": "img", "type": "choices", "value": {"choices": ["other"]}}
    ]
    annotation = ls.sdk("annotate", task=tasks[0], result=choice)
    ls.sdk("annotate", task=tasks[2], result=[{**choice[0], "value": {"choices": ["malignant"]}}])
    (label,) = labels_of(coreloop, images[0], 1)
    assert (label["class_name"], label["source"]) == ("other", "label-studio")
    assert label["author_name"] == f"ls:{me}"
    assert labels_of(coreloop, images[2], 1)[0]["class_name"] == "malignant"

    ls.sdk(
        "update_annotation", id=annotation, result=[{**choice[0], "value": {"choices": ["benign"]}}]
    )
    history = labels_of(coreloop, images[0], 2)
    assert [h["class_name"] for h in history] == ["benign", "other"]


@pytest.mark.slow
def test_segmentation_brush_predictions_and_annotations(
    label_studio: LabelStudioServer, coreloop: CoreloopServer
) -> None:
    predicted = _disc(10, 12, 6)
    coreloop.storage.put_bytes("masks/interop/pred.png", encode_png_mask(predicted))
    project_id, images = seed(
        coreloop,
        "segmentation",
        ["lesion"],
        [{"mask_key": "masks/interop/pred.png", "predicted_loss": 0.25}, {}],
    )
    ls = label_studio
    ls_project = ls.sdk("create_project", title="coreloop-seg", label_config=BRUSH_CONFIG)
    data = [{"image": f"{coreloop.url}/images/{image_id}/file"} for image_id in images]
    tasks = ls.sdk("import_tasks", project=ls_project, tasks=[{"data": d} for d in data])
    connect(ls, coreloop, ls_project, f"{coreloop.url}/ls/projects/{project_id}")

    ls.sdk("retrieve_predictions", project=ls_project, tasks=tasks)
    (with_mask,), (without,) = (ls.sdk("predictions", task=task_id) for task_id in tasks)
    assert without["result"] == [] and without["score"] == 1.0
    (region,) = with_mask["result"]
    assert (region["type"], region["original_width"], region["original_height"]) == (
        "brushlabels",
        W,
        H,
    )
    sdk_decoded = np.array(ls.sdk("decode_rle", rle=region["value"]["rle"]), dtype=np.uint8)
    assert (sdk_decoded.reshape(H, W, 4)[:, :, 3] == predicted * 255).all()

    drawn = _disc(20, 8, 5)
    rle = ls.sdk("mask2rle", mask=(drawn * 255).astype(int).tolist())
    brush = {
        "from_name": "seg",
        "to_name": "img",
        "type": "brushlabels",
        "original_width": W,
        "original_height": H,
        "value": {"format": "rle", "rle": rle, "brushlabels": ["lesion"]},
    }
    ls.sdk("annotate", task=tasks[1], result=[brush])
    (label,) = labels_of(coreloop, images[1], 1)
    assert label["source"] == "label-studio" and label["mask_url"]
    headers = {"Authorization": f"Bearer {coreloop.token}"}
    png = httpx.get(f"{coreloop.url}{label['mask_url']}", headers=headers, timeout=30).content
    assert ((np.asarray(PILImage.open(io.BytesIO(png))) > 0) == drawn).all()


def test_rle_matches_label_studio_sdk(ls_driver: LsDriver) -> None:
    """``app.integrations.labelstudio.rle`` against the real
    ``label_studio_sdk.converter.brush``, both ways."""
    rng = np.random.default_rng(3)
    masks = [
        _disc(12, 9, 7),
        rng.random((H, W)) < 0.3,
        np.zeros((H, W), bool),
        np.ones((5, 70000), bool),
    ]
    for mask in masks:
        sdk_rle = ls_driver.call("mask2rle", mask=(mask * 255).astype(int).tolist())
        assert encode_mask(mask) == sdk_rle
        decoded = np.array(ls_driver.call("decode_rle", rle=encode_mask(mask)), dtype=np.uint8)
        assert (decoded == np.repeat((mask * 255).astype(np.uint8).ravel(), 4)).all()
        assert (decode_mask(sdk_rle, mask.shape[1], mask.shape[0]) == mask).all()
