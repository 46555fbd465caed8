"""Exports of a project with several readers (issue 15): every read, and the consensus."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pycocotools import mask as mask_util

from app.exports.coco import parse_coco
from app.exports.labelstudio import parse_ls
from app.exports.tabular import parse_csv
from app.models import Image, Project, Role, User
from tests.api.test_formats_roundtrip import H, W, export, post_label

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_class_exports_carry_each_read_and_the_consensus(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
) -> None:
    project = make_project(overlap=2, classes=["a", "b", "c"])
    agreed, tied, alone, settled = (make_image(project) for _ in range(4))
    readers = [_h(make_user(name)[1]) for name in ("ana", "ben")]
    _, admin = make_user("boss", Role.admin)
    post_label(client, readers[0], agreed.id, "1", 2)
    post_label(client, readers[0], agreed.id, "1b", 1)  # ana changes her mind: her newest counts
    post_label(client, readers[1], agreed.id, "2", 1)
    post_label(client, readers[0], tied.id, "3", 0)
    post_label(client, readers[1], tied.id, "4", 1)
    post_label(client, readers[0], alone.id, "5", 2)
    post_label(client, readers[0], settled.id, "6", 0)
    post_label(client, readers[1], settled.id, "7", 2)
    post_label(client, _h(admin), settled.id, "8", 1)

    tasks = {t["id"]: t for t in json.loads(export(client, admin_headers, project.id, "ls", False))}

    def summary(image: Image) -> list[tuple[str | None, str, bool]]:
        return [
            (a.get("coreloop_author"), a["result"][0]["value"]["choices"][0],
             bool(a.get("ground_truth")))
            for a in tasks[image.id]["annotations"]
        ]  # fmt: skip

    assert summary(agreed) == [("ana", "b", False), ("ben", "b", False), (None, "b", True)]
    assert summary(tied) == [("ana", "a", False), ("ben", "b", False)]
    assert summary(alone) == [("ana", "c", False)]
    # Settled by the admin: the reads and the settling label (it is the label; no extra one).
    assert summary(settled) == [("ana", "a", False), ("ben", "c", False), ("boss", "b", False)]

    rows = list(csv.DictReader(io.StringIO(export(client, admin_headers, project.id, "csv",
                                                  False).decode())))  # fmt: skip
    mine = [
        (r["author"], r["class_name"], r["source"]) for r in rows if r["image_id"] == str(agreed.id)
    ]
    assert mine == [("ana", "b", "human"), ("ben", "b", "human"), ("", "b", "consensus")]

    coco = json.loads(export(client, admin_headers, project.id, "coco", False))
    consensus = [a for a in coco["annotations"] if a.get("coreloop_source") == "consensus"]
    assert [(a["image_id"], a["category_id"]) for a in consensus] == [(agreed.id, 2)]

    # Importing skips the consensus: it is derived from the reads, which are imported.
    for parse, fmt in ((parse_ls, "ls"), (parse_coco, "coco"), (parse_csv, "csv")):
        items = parse(export(client, admin_headers, project.id, fmt, False))
        assert len(items) == 2 + 2 + 1 + 3, fmt


def test_mask_exports_carry_the_majority_mask(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    make_user: Callable[..., tuple[User, str]],
    admin_headers: dict[str, str],
) -> None:
    project = make_project(overlap=3, task="segmentation", classes=["lesion"], mask_agreement=0.0)
    image = make_image(project)
    masks = [np.zeros((H, W), dtype=bool) for _ in range(3)]
    masks[0][:, :12] = True
    masks[1][:, 4:20] = True
    masks[2][:, 8:28] = True
    for i, mask in enumerate(masks):
        post_label(client, _h(make_user(f"r{i}")[1]), image.id, f"m{i}", mask)
    coco = json.loads(export(client, admin_headers, project.id, "coco", False))
    (consensus,) = [a for a in coco["annotations"] if a.get("coreloop_source") == "consensus"]
    rle = consensus["segmentation"]
    got = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
    want = np.zeros((H, W), dtype=bool)
    want[:, 4:20] = True  # at least 2 of the 3 readers
    assert np.array_equal(got, want)
    assert len([a for a in coco["annotations"] if a.get("coreloop_source") == "human"]) == 3
    ls = json.loads(export(client, admin_headers, project.id, "ls", False))
    assert [bool(a.get("ground_truth")) for a in ls[0]["annotations"]] == [False] * 3 + [True]
