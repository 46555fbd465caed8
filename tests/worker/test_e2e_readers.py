"""End to end with several readers (issue 15), real API and worker processes (embedded SQLite).

Two annotators read the same 20 images blind and disagree on 5; the reviewer's queue holds
exactly those 5; the reviewer settles them; the next round trains on the 20 consensus labels
only; the agreement endpoint returns the kappa computed by hand. The same for masks, with Dice.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.labels.masks import mask_to_rle
from tests.worker.conftest import ApiClient, Processes, lesion_png
from tests.worker.test_e2e import admin_client, deployment_settings

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]
SIZE = 32


def _user(api: ApiClient, url: str, project_id: int, name: str, role: str) -> ApiClient:
    created = api.ok("POST", "/users", json={"name": name, "role": role})
    api.ok("POST", f"/projects/{project_id}/members", json={"user_id": created["id"]})
    return ApiClient(url, created["token"])


def _read_all(reader: ApiClient, project_id: int, content: Any) -> list[int]:
    """Lease and read everything the queue offers this reader; ``content(image_id)`` is the
    label body's content. Returns the image ids read."""
    read: list[int] = []
    while entries := reader.ok("GET", "/queue", params={"project_id": project_id, "limit": 50}):
        for entry in entries:
            body = {"image_id": entry["image_id"], "lease_id": entry["lease_id"],
                    "idempotency_key": uuid.uuid4().hex, **content(entry["image_id"])}  # fmt: skip
            reader.ok("POST", "/labels", json=body)
            read.append(entry["image_id"])
    return read


def _kappa_by_hand(a: list[int], b: list[int], n_classes: int) -> float:
    table = np.zeros((n_classes, n_classes))
    for x, y in zip(a, b, strict=True):
        table[x, y] += 1
    total = table.sum()
    observed = np.trace(table) / total
    expected = (table.sum(axis=1) * table.sum(axis=0)).sum() / total**2
    return float((observed - expected) / (1 - expected))


def _square(x0: int, width: int = 16) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8:24, x0 : x0 + width] = True
    return mask


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_two_blind_readers_a_reviewer_and_a_round_on_consensus(
    task: str, tmp_path: Path, processes: Processes
) -> None:
    settings = deployment_settings("sqlite", None, tmp_path)
    url = processes.start_api(settings)
    processes.start_worker(settings)
    api = admin_client(settings, url)
    rng = np.random.default_rng(11)
    classes = task == "classification"
    project_id = api.create_project(
        task=task, overlap=2, initial_fraction=0.5, budget=4,
        **({} if classes else {"classes": ["lesion"]}),
    )  # fmt: skip
    truth = {i: i % 3 for i in api.upload(project_id, [lesion_png(rng, k % 3) for k in range(40)],
                                          "pool")}  # fmt: skip
    names = api.ok("GET", f"/projects/{project_id}")["classes"]
    test_ids = api.upload(project_id, [lesion_png(rng, k % len(names)) for k in range(6)], "test")
    for k, image_id in enumerate(test_ids):  # the admin's labels of the test split settle it
        content = {"class_index": k % 3} if classes else {"mask_rle": mask_to_rle(_square(8))}
        api.ok("POST", "/labels", json={"image_id": image_id, "idempotency_key": f"t{k}",
                                        **content})  # fmt: skip
    ana = _user(api, url, project_id, "ana", "annotator")
    ben = _user(api, url, project_id, "ben", "annotator")
    rev = _user(api, url, project_id, "rev", "reviewer")

    api.wait_round(api.start_round(project_id))  # round 0: the random initial 20
    batch = sorted(e["image_id"] for e in ana.ok("GET", "/queue", params={
        "project_id": project_id, "limit": 50}))  # fmt: skip
    assert len(batch) == 20
    disputed = set(batch[:5])
    if classes:
        ana_read = {i: truth[i] for i in batch}
        ben_read = {i: (truth[i] + 1) % 3 if i in disputed else truth[i] for i in batch}
        a_content: Any = lambda i: {"class_index": ana_read[i]}  # noqa: E731
        b_content: Any = lambda i: {"class_index": ben_read[i]}  # noqa: E731
    else:  # ben's square is shifted by 8 px on 5 images (Dice 0.5), by 1 px on the rest
        a_content = lambda i: {"mask_rle": mask_to_rle(_square(8))}  # noqa: E731
        b_content = lambda i: {"mask_rle": mask_to_rle(_square(16 if i in disputed else 9))}  # noqa: E731
    assert sorted(_read_all(ana, project_id, a_content)) == batch
    # Blind: ben sees none of ana's reads, and reads all 20 himself.
    assert ben.ok("GET", f"/images/{batch[0]}/labels") == []
    assert sorted(_read_all(ben, project_id, b_content)) == batch
    assert api.ok("GET", f"/projects/{project_id}")["counts"]["labeled"] == 15

    queue = rev.ok("GET", "/review", params={"project_id": project_id, "limit": 50})
    assert sorted(e["image_id"] for e in queue) == sorted(disputed)
    for entry in queue:  # keep ana's read
        (kept,) = [r for r in entry["reads"] if r["author_name"] == "ana"]
        rev.ok("POST", f"/review/{entry['id']}/settle", json={"label_id": kept["label_id"]})
    assert rev.ok("GET", "/review", params={"project_id": project_id}) == []

    agreement = rev.ok("GET", f"/projects/{project_id}/agreement")
    assert agreement["images_compared"] == 20
    assert agreement["adjudication_rate"] == pytest.approx(5 / 20)
    if classes:
        a, b = [ana_read[i] for i in batch], [ben_read[i] for i in batch]
        assert agreement["kappa"] == pytest.approx(_kappa_by_hand(a, b, 3))
    else:  # Dice by hand: 16 x 16 squares, shifted by 1 px (15/16) on 15, by 8 px (8/16) on 5
        assert agreement["mean_dice"] == pytest.approx((15 * 15 / 16 + 5 * 8 / 16) / 20)

    second = api.wait_round(api.start_round(project_id))
    assert second["labeled_count"] == 20
    assert second["metrics"]["train_size"] == 20
