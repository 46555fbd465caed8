"""Inter-reader agreement (issue 15): kappa, confusion, Dice, adjudication rate."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import cohen_kappa_score

from app.agreement.service import cohen_kappa, fleiss_kappa
from app.labels.masks import mask_to_rle
from app.models import Image, Project, Role, User

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_cohen_kappa_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 50)
    b = np.where(rng.random(50) < 0.7, a, rng.integers(0, 3, 50))
    got = cohen_kappa(list(zip(a.tolist(), b.tolist(), strict=True)), 3)
    assert got == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa([], 3) is None
    assert cohen_kappa([(1, 1), (1, 1)], 3) is None  # chance agreement 1: undefined


def test_fleiss_kappa_of_the_textbook_example() -> None:
    """Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories: 0.210."""
    counts = np.array([
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ])  # fmt: skip
    assert fleiss_kappa(counts) == pytest.approx(0.20993, abs=1e-4)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[1, 1], [2, 1]]))


def _label(client: TestClient, token: str, image: Image, key: str, **content: object) -> None:
    body = {"image_id": image.id, "idempotency_key": key, **content}
    response = client.post("/labels", json=body, headers=_h(token))
    assert response.status_code == 201, response.text


def test_two_readers_of_20_images_disagreeing_on_5(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
) -> None:
    project = make_project(overlap=2, classes=["benign", "malignant"])
    images = [make_image(project) for _ in range(20)]
    a, token_a = make_user("reader-a")
    b, token_b = make_user("reader-b")
    _, reviewer = make_user("rev", Role.reviewer)
    _, admin = make_user("boss", Role.admin)
    truth = [i % 2 for i in range(20)]
    other = [1 - t if i < 5 else t for i, t in enumerate(truth)]  # b disagrees on the first 5
    for i, image in enumerate(images):
        _label(client, token_a, image, f"a{i}", class_index=truth[i])
        _label(client, token_b, image, f"b{i}", class_index=other[i])
    # By hand: agreement 15/20; a chose class 0 10 times and 1 10 times, b 9 and 11: chance
    # (10 * 9 + 10 * 11) / 400 = 0.5, so kappa = (0.75 - 0.5) / (1 - 0.5) = 0.5.
    got = client.get(f"/projects/{project.id}/agreement", headers=_h(reviewer))
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["kappa_method"] == "cohen"
    assert body["kappa"] == pytest.approx(0.5)
    assert body["agreement"] == pytest.approx(0.75)
    assert body["adjudication_rate"] == pytest.approx(5 / 20)
    assert body["images_compared"] == 20 and body["pairs"] == 20
    # Symmetric confusion: the 15 agreeing pairs (7 on class 0, 8 on 1) count twice on the
    # diagonal; the 5 disagreeing ones once each way.
    assert body["confusion"] == [[14, 5], [5, 16]]
    readers = {r["name"]: r for r in body["annotators"]}
    assert set(readers) == {"reader-a", "reader-b"}
    assert readers["reader-a"]["user_id"] == a.id and readers["reader-b"]["user_id"] == b.id
    assert readers["reader-a"]["kappa"] == pytest.approx(0.5)
    assert readers["reader-a"]["agreement"] == pytest.approx(0.75)
    # Settling the disputed images does not change the rate (they needed adjudication).
    for i in range(5):
        _label(client, admin, images[i], f"s{i}", class_index=truth[i])
    again = client.get(f"/projects/{project.id}/agreement", headers=_h(admin)).json()
    assert again["adjudication_rate"] == pytest.approx(5 / 20)
    assert again["kappa"] == pytest.approx(0.5)
    # Annotators do not see it; non-members do not reach it.
    assert client.get(f"/projects/{project.id}/agreement", headers=_h(token_a)).status_code == 403
    _, outsider = make_user("outsider", member=False)
    assert client.get(f"/projects/{project.id}/agreement", headers=_h(outsider)).status_code == 404


def test_three_readers_use_fleiss_kappa(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
) -> None:
    project = make_project(overlap=3, classes=["x", "y"])
    images = [make_image(project) for _ in range(4)]
    tokens = [make_user(f"r{j}")[1] for j in range(3)]
    votes = [[0, 0, 0], [1, 1, 1], [0, 1, 1], [0, 0, 1]]
    for i, image in enumerate(images):
        for j, token in enumerate(tokens):
            _label(client, token, image, f"{i}-{j}", class_index=votes[i][j])
    body = client.get(f"/projects/{project.id}/agreement", headers=admin_headers).json()
    counts = np.array([np.bincount(v, minlength=2) for v in votes])
    assert body["kappa_method"] == "fleiss"
    assert body["kappa"] == pytest.approx(fleiss_kappa(counts))
    assert body["adjudication_rate"] == 0.0  # three readers, two classes: never a tie


def test_mask_agreement_is_the_mean_pairwise_dice(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
) -> None:
    project = make_project(overlap=2, task="segmentation", classes=["lesion"])
    image = make_image(project)  # 32 x 24
    tokens = [make_user(f"m{j}")[1] for j in range(2)]
    first = np.zeros((24, 32), dtype=bool)
    first[:, :16] = True  # 384 pixels
    second = np.zeros((24, 32), dtype=bool)
    second[:, 8:24] = True  # 384 pixels, 192 shared
    for j, (token, mask) in enumerate(zip(tokens, (first, second), strict=True)):
        _label(client, token, image, f"mask-{j}", mask_rle=mask_to_rle(mask))
    body = client.get(f"/projects/{project.id}/agreement", headers=admin_headers).json()
    assert body["pairs"] == 1
    assert body["mean_dice"] == pytest.approx(2 * 192 / 768)
    assert body["mean_iou"] == pytest.approx(192 / 576)
    assert [r["mean_dice"] for r in body["annotators"]] == [pytest.approx(0.5)] * 2
