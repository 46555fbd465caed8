"""What ``coreloop demo --data DIR`` makes of a folder (in-process; no server, no worker)."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from app.settings import Settings, get_settings
from coreloop.cli import main
from coreloop.demo import DemoData, _demo_session, load_demo_data

# HAM10000's classes, scaled down ~10x, in the order its metadata file lists them (one class
# after another: the first rows of the real file are all bkl, then nv, df, mel, ...).
HAM_CLASSES = {"bkl": 110, "df": 12, "mel": 111, "vasc": 14, "bcc": 51, "nv": 670, "akiec": 33}
LESION_SIZES = (1, 2, 1, 3, 1)  # images per lesion, cycled (real lesions have 1 to 6)


def _write_ham10000(root: Path) -> list[dict[str, str]]:
    """A HAM10000-layout folder: ``HAM10000_metadata.csv`` and tiny ``images/<image_id>.jpg``."""
    (root / "images").mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 120, 90)).save(jpeg, format="JPEG")
    rows: list[dict[str, str]] = []
    lesion = 0
    for dx, count in HAM_CLASSES.items():
        left = count
        while left:
            size = min(left, LESION_SIZES[lesion % len(LESION_SIZES)])
            for _ in range(size):
                rows.append({"lesion_id": f"HAM_{lesion:07d}", "image_id": f"ISIC_{len(rows):07d}",
                             "dx": dx, "dx_type": "histo"})  # fmt: skip
            lesion += 1
            left -= size
    lines = ["lesion_id,image_id,dx,dx_type"] + [",".join(r.values()) for r in rows]
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    for row in rows:
        (root / "images" / f"{row['image_id']}.jpg").write_bytes(jpeg.getvalue())
    return rows


def _args(data: Path, limit: int = 0, task: str = "classification") -> argparse.Namespace:
    return argparse.Namespace(data=str(data), limit=limit, task=task, images=0)


@pytest.mark.parametrize("limit", [60, 200])  # the issue's --limit 600 and the README's 2000, /10
def test_limit_samples_whole_lesions_of_every_class_in_proportion(
    tmp_path: Path, limit: int
) -> None:
    rows = _write_ham10000(tmp_path / "ham")
    data = load_demo_data(_args(tmp_path / "ham", limit), Settings(data_dir=tmp_path / "d"))

    chosen = [f.stem for f in data.pool + data.test]
    assert limit - max(LESION_SIZES) < len(chosen) <= limit
    assert data.classes == sorted(HAM_CLASSES)  # all 7, not the CSV's first class or two
    by_image = {r["image_id"]: r for r in rows}
    counts = Counter(by_image[i]["dx"] for i in chosen)
    for dx, total in HAM_CLASSES.items():  # each class near its share of the limit
        assert abs(counts[dx] - limit * total / len(rows)) <= max(LESION_SIZES), (dx, counts)
    lesion_of = {r["image_id"]: r["lesion_id"] for r in rows}
    images_of = Counter(r["lesion_id"] for r in rows)
    kept = Counter(lesion_of[i] for i in chosen)
    assert all(kept[lesion] == images_of[lesion] for lesion in kept)  # whole lesions only
    test_lesions = {lesion_of[f.stem] for f in data.test}
    assert test_lesions.isdisjoint(lesion_of[f.stem] for f in data.pool)
    assert 0.1 < len(data.test) / len(chosen) < 0.3
    assert {data.truth[f.name] for f in data.test} >= {"bkl", "mel", "nv"}  # test is stratified
    # The same folder and limit give the same selection (it is the data, not a run's seed).
    again = load_demo_data(_args(tmp_path / "ham", limit), Settings(data_dir=tmp_path / "d"))
    assert (again.pool, again.test) == (data.pool, data.test)


def _write_class_folders(root: Path, formats: dict[str, str]) -> None:
    for n, (class_name, fmt) in enumerate(formats.items()):
        (root / class_name).mkdir(parents=True)
        for i in range(5):
            image = Image.new("RGB", (8, 8), (40 * n, 10 * i, 90))
            image.save(root / class_name / f"IMD{i:03d}.{fmt.lower()}", format=fmt)


def test_class_folders_of_bmp_tiff_and_webp_images_are_read(tmp_path: Path) -> None:
    """A public dermoscopy set ships as BMPs in diagnosis folders (the importer takes them)."""
    _write_class_folders(tmp_path / "set", {"common": "BMP", "atypical": "BMP", "mel": "TIFF"})
    (tmp_path / "set" / "extra").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "extra" / "x.webp", format="WEBP")
    data = load_demo_data(_args(tmp_path / "set"), Settings(data_dir=tmp_path / "d"))
    assert data.classes == ["atypical", "common", "extra", "mel"]
    files = data.pool + data.test
    assert len(files) == 16 and data.test
    # The same file name in several class folders: each is uploaded under its own name.
    names = [data.name_of(f) for f in files]
    assert len(set(names)) == 16
    assert Counter(data.truth[n] for n in names) == {
        "common": 5,
        "atypical": 5,
        "mel": 5,
        "extra": 1,
    }


@pytest.fixture
def demo_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    monkeypatch.setenv("CORELOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CORELOOP_DATABASE_URL", raising=False)
    monkeypatch.delenv("CORELOOP_BROKER_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.parametrize("case", ["missing", "empty", "one-class", "loose-images"])
def test_a_folder_the_demo_cannot_use_is_one_line_and_exit_code_2(
    demo_env: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = demo_env / "set"
    if case != "missing":
        folder.mkdir()
    if case == "one-class":
        _write_class_folders(folder, {"nevus": "BMP"})
    if case == "loose-images":
        Image.new("RGB", (8, 8)).save(folder / "a.png")
    # Nothing is started for a folder the demo cannot use (no server, no worker).
    assert main(["demo", "--data", str(folder), "--exit", "--port", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data ") and err.count("\n") == 1, err
    assert "the demo expects" in err and "Traceback" not in err
    assert not (demo_env / "data" / "logs").exists()  # nothing was started


# -- segmentation: the test split's masks are labels -------------------------------------------


def _segmentation_data(root: Path, n: int = 10) -> DemoData:
    (root / "masks").mkdir(parents=True)
    files = []
    for i in range(n):
        path = root / f"img{i}.png"
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(path)
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 255
        Image.fromarray(mask).save(root / "masks" / f"img{i}_segmentation.png")
        files.append(path)
    return DemoData(
        source=str(root),
        classes=[],
        pool=files[:7],
        test=files[7:],
        truth={f.name: "" for f in files},
        masks={f.name: root / "masks" / f"{f.stem}_segmentation.png" for f in files},
    )


class FakeServer:
    """Just enough of the API for one demo session, recording the requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.uploaded: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        method, path = request.method, request.url.path
        body = request.read()
        if (method, path) == ("GET", "/projects"):
            return httpx.Response(200, json=[])
        if (method, path) == ("GET", "/users/me"):
            return httpx.Response(200, json={"id": 2, "name": "annotator", "role": "annotator"})
        if (method, path) == ("POST", "/projects/1/members"):
            self.calls.append((method, path, json.loads(body)))
            return httpx.Response(201, json={"user_id": 2, "role": "annotator"})
        if (method, path) == ("POST", "/projects"):
            return httpx.Response(
                201, json={"id": 1, "task": "segmentation", "classes": ["lesion"]}
            )
        if (method, path) == ("POST", "/projects/1/images"):
            names = re.findall(rb'name="files"; filename="([^"]+)"', body)
            items = []
            for name in names:
                self.uploaded.setdefault(name.decode(), len(self.uploaded) + 1)
                items.append(
                    {"image": {"id": self.uploaded[name.decode()]}, "filename": name.decode()}
                )
            return httpx.Response(201, json={"items": items})
        if (method, path) == ("POST", "/labels"):
            image_id = int(re.search(rb'name="image_id"\r\n\r\n(\d+)', body).group(1))  # type: ignore[union-attr]
            self.calls.append(
                (method, path, {"image_id": image_id, "mask": b'name="mask"' in body})
            )
            return httpx.Response(201, json={"id": len(self.calls)})
        if (method, path) == ("GET", "/rounds"):
            return httpx.Response(200, json=[])
        if path == "/rounds" or path.startswith("/rounds/"):
            self.calls.append((method, path, {}))
            round_ = {"id": 1, "number": 0, "status": "done", "labeled_count": 3,
                      "metrics": {"test": {"jaccard": 0.5, "dice": 0.6}}}  # fmt: skip
            return httpx.Response(201 if method == "POST" else 200, json=round_)
        return httpx.Response(404, json={"error": "NotFound", "detail": path})


def test_segmentation_demo_labels_the_test_split_with_its_masks_before_round_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _segmentation_data(tmp_path)
    server = FakeServer()
    args = argparse.Namespace(
        project=None,
        task="segmentation",
        budget=4,
        image_size=32,
        epochs=1,
        simulate=False,
        warm_start=False,
    )
    tokens = {"admin": "cl_a", "annotator": "cl_b"}
    with httpx.Client(base_url="http://demo", transport=httpx.MockTransport(server)) as client:
        _demo_session(client, "http://demo", tokens, args, data)

    assert ("POST", "/projects/1/members", {"user_id": 2, "role": "annotator"}) in server.calls
    labels = [c for c in server.calls if c[1] == "/labels"]
    test_ids = {server.uploaded[f.name] for f in data.test}
    assert {c[2]["image_id"] for c in labels} == test_ids and len(labels) == len(test_ids)
    assert all(c[2]["mask"] for c in labels)
    first_round = next(i for i, c in enumerate(server.calls) if c[:2] == ("POST", "/rounds"))
    assert all(server.calls.index(c) < first_round for c in labels)
    assert "test {'jaccard': 0.5, 'dice': 0.6}" in capsys.readouterr().out
