"""The annotator page at /ui, driven in headless Chromium against a real server.

Labels are read back through the API, so these tests check what the page sent, not what it
showed.
"""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image as PILImage
from playwright.sync_api import Page, Route, expect
from sqlalchemy import select

from app.models import Lease, ModelVersion, ReviewItem, Role
from coreloop.synthetic import SYNTHETIC_CLASSES, render_lesion
from tests.browser.conftest import LiveServer

pytestmark = pytest.mark.e2e

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def sign_in(page: Page, live: LiveServer, token: str) -> None:
    page.goto(f"{live.url}/ui")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_be_visible()


def expect_image(page: Page, image_id: int) -> None:
    """Wait until ``image_id`` is on screen and ready for input."""
    stage = page.locator("#stage")
    expect(stage).to_have_attribute("data-image-id", str(image_id))
    expect(stage).to_have_attribute("data-state", "ready")


def labels_of(live: LiveServer, token: str, image_id: int) -> list[dict[str, Any]]:
    labels: list[dict[str, Any]] = live.get(token, f"/images/{image_id}/labels")
    return labels


def test_ui_files_are_served_without_auth(live: LiveServer) -> None:
    page = httpx.get(f"{live.url}/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        asset = httpx.get(f"{live.url}/ui/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
    missing = httpx.get(f"{live.url}/ui/index.py")
    assert (missing.status_code, missing.json()["error"]) == (404, "NotFound")
    assert httpx.get(f"{live.url}/ui/..%2Fmain.py").status_code == 404


def test_sign_in_errors_persistence_and_sign_out(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    project = live.project(name="synthetic-demo")
    live.lesions(project, 1)
    _, token = live.user(Role.annotator, name="dr-lee")

    page.goto(f"{live.url}/ui")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Unauthorized: The token is not valid")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    screenshot("sign-in-error")

    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(alert).to_be_hidden()
    expect(page.locator("#who-name")).to_have_text("dr-lee")
    expect(page.get_by_role("tab", name="Admin")).to_be_hidden()
    # The project's name says synthetic: the page says so too.
    expect(page.get_by_role("note")).to_contain_text("Synthetic images")

    page.reload()
    expect(page.locator("#who-name")).to_have_text("dr-lee")
    assert page.evaluate("localStorage.getItem('coreloop.token')") == token

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("localStorage.getItem('coreloop.token')") is None


def test_classification_by_click_and_keys_with_skip_and_retry(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    project = live.project(name="lesions")
    images = live.lesions(project, 4)
    round_id = live.round(project, 0)
    live.queue(project, round_id, images)
    model = live.model(project, round_id, {"test": {"accuracy": 0.7}})
    live.prediction(model, images[0], class_probs=[0.15, 0.7, 0.15])
    user_id, token = live.user()

    sign_in(page, live, token)
    expect_image(page, images[0])
    expect(page.locator("#suggestion")).to_have_text(
        "The model suggests melanoma (70%). Press A to accept."
    )
    expect(page.get_by_role("note")).to_contain_text("not medical data")  # meta.synthetic
    expect(page.locator("#progress-text")).to_contain_text("Labeled 0 of 4 pool images")
    expect(page.locator("#hint-list")).to_contain_text("1–3 label with that class")
    screenshot("annotator-classification")

    page.get_by_role("button", name=re.compile("melanoma")).click()
    expect_image(page, images[1])
    expect(page.locator("#suggestion")).to_have_text("No model suggestion for this image yet.")
    page.keyboard.press("1")
    expect_image(page, images[2])
    page.keyboard.press("s")
    expect_image(page, images[3])

    # The first answer reaches the server but its response is lost: the page shows the
    # error, and the retried key press reuses the idempotency key (no second label).
    def lose_response(route: Route) -> None:
        route.fetch()
        route.abort()

    page.route("**/labels", lose_response, times=1)
    page.keyboard.press("3")
    expect(page.get_by_role("alert")).to_contain_text("NetworkError")
    expect_image(page, images[3])
    page.keyboard.press("3")
    expect(page.locator("#empty-text")).to_contain_text("Nothing to label right now")
    expect(page.locator("#progress-text")).to_contain_text("Labeled 3 of 4 pool images")
    expect(page.locator("#session-text")).to_have_text("This session: 3 labeled, 1 skipped")

    got = {image: labels_of(live, token, image) for image in images}
    assert [label["class_index"] for label in got[images[0]]] == [1]
    assert [label["class_index"] for label in got[images[1]]] == [0]
    assert got[images[2]] == []
    assert [label["class_index"] for label in got[images[3]]] == [2]
    labeled = [got[images[i]][0] for i in (0, 1, 3)]
    assert all(label["author_id"] == user_id and label["lease_id"] for label in labeled)
    assert all(UUID_RE.match(label["idempotency_key"]) for label in labeled)
    assert len({label["idempotency_key"] for label in labeled}) == 3
    with live.sessions() as session:
        skipped = session.scalars(select(Lease.state).where(Lease.image_id == images[2])).all()
    assert skipped == ["skipped"]


def distance_to_path(shape: tuple[int, int], path: list[tuple[float, float]]) -> np.ndarray:
    """Distance from every pixel centre to the polyline ``path`` of (x, y) image points."""
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    best = np.full(shape, np.inf)
    for (x0, y0), (x1, y1) in zip(path, path[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        best = np.minimum(best, np.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy)))
    return best


def drag(
    page: Page,
    path: list[tuple[float, float]],
    size: tuple[int, int],
    canvas: str = "#mask-canvas",
) -> None:
    """Drag the mouse over a mask canvas through image-pixel points (x, y)."""
    box = page.locator(canvas).bounding_box()
    assert box is not None
    width, height = size

    def at(x: float, y: float) -> tuple[float, float]:
        return box["x"] + x / width * box["width"], box["y"] + y / height * box["height"]

    page.mouse.move(*at(*path[0]))
    page.mouse.down()
    for point in path[1:]:
        page.mouse.move(*at(*point), steps=8)
    page.mouse.up()


def test_segmentation_paint_erase_and_submit(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    height, width = 72, 96  # not square: the pointer mapping must keep x and y apart
    project = live.project(name="lesion masks", task="segmentation", classes=["lesion"])
    rng = np.random.default_rng(7)
    samples = [render_lesion(rng, "melanoma", width) for _ in range(2)]
    images = [live.image(project, s.image[12:84], meta={"synthetic": True}) for s in samples]
    round_id = live.round(project, 0)
    live.queue(project, round_id, images)
    model = live.model(project, round_id, {"test": {"dice": 0.61}})
    # An imperfect model: the lesion's true mask, shifted 6 px to the right.
    predicted = np.roll(samples[0].mask[12:84] > 0, 6, axis=1)
    live.prediction(model, images[0], mask=predicted)
    _, token = live.user()

    sign_in(page, live, token)
    expect_image(page, images[0])
    expect(page.locator("#seg-source")).to_contain_text("the model's predicted mask")
    expect(page.locator("#mask-coverage")).to_contain_text(f"({int(predicted.sum())} pixels)")
    expect(page.get_by_role("note")).to_contain_text("Synthetic images")

    radius = 5
    page.keyboard.press("]")  # the default for 96x72 is 3 (min side / 24)
    page.keyboard.press("]")
    expect(page.locator("#brush-size-out")).to_have_text(str(radius))
    ys, xs = np.nonzero(predicted)
    right = float(xs.max()) + 1
    erased = [(right - 4, float(ys.min()) - 2), (right - 4, float(ys.max()) + 3)]
    painted_path = [(6.0, 8.0), (34.0, 8.0), (34.0, 26.0)]
    drag(page, painted_path, (width, height))  # brush: an L in the top left corner
    page.keyboard.press("e")
    expect(page.get_by_role("button", name="Eraser")).to_have_attribute("aria-pressed", "true")
    drag(page, erased, (width, height))  # eraser: trim the prediction's right edge
    page.mouse.move(10, 10)  # the brush cursor off the canvas for the screenshot
    screenshot("annotator-segmentation")

    page.get_by_role("button", name="Submit mask").click()
    expect_image(page, images[1])
    expect(page.locator("#seg-source")).to_contain_text("No predicted mask")
    page.keyboard.press("s")
    expect(page.locator("#empty-text")).to_contain_text("Nothing to label right now")

    (label,) = labels_of(live, token, images[0])
    assert label["mask_url"] and label["class_index"] is None
    response = live.get(token, label["mask_url"])
    mask = np.asarray(PILImage.open(io.BytesIO(response.content)).convert("L"))
    assert mask.shape == (height, width)
    assert set(np.unique(mask).tolist()) <= {0, 255}
    got = mask == 255
    # Pointer positions are exact to a fraction of a pixel: check the strokes' cores, and
    # that the prediction is kept everywhere away from them.
    brush = distance_to_path(got.shape, painted_path)
    eraser = distance_to_path(got.shape, erased)
    assert got[brush <= radius - 1.5].all()
    assert not got[eraser <= radius - 1.5].any()
    away = (brush > radius + 1.5) & (eraser > radius + 1.5)
    assert (got[away] == predicted[away]).all()
    assert predicted[eraser <= radius - 1.5].sum() > 20  # the eraser really removed something
    assert labels_of(live, token, images[1]) == []


def test_admin_stats_curve_models_and_round(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    project = live.project(name="ham10000-pilot", budget_count=24)
    pool = live.lesions(project, 6)
    live.lesions(project, 2, split="test", seed=1)
    curve = [(40, 0.52, 0.48), (64, 0.63, 0.6), (88, 0.71, 0.69)]
    for number, (labeled, accuracy, balanced) in enumerate(curve):
        test = {"accuracy": accuracy, "balanced_accuracy": balanced, "n": 2}
        round_id = live.round(
            project, number, labeled_count=labeled, metrics={"test": test, "history": []}
        )
        newest = live.model(project, round_id, {"test": test, "labeled_count": labeled})
    with live.sessions() as session:
        checkpoint = session.get_one(ModelVersion, newest).checkpoint_key
    live.queue(project, round_id, pool[:2])
    _, token = live.user(Role.admin, name="admin")

    sign_in(page, live, token)
    expect_image(page, pool[0])
    page.get_by_role("tab", name="Admin").click()
    stats = page.locator("#stats")
    expect(stats.locator("div", has_text="Pool images").locator("dd")).to_have_text("6")
    expect(stats.locator("div", has_text="Test images").locator("dd")).to_have_text("2")
    expect(stats.locator("div", has_text="Rounds").locator("dd")).to_have_text("3")
    expect(stats.locator("div", has_text="Leased now").locator("dd")).to_have_text("1")
    expect(page.locator("#curve svg circle")).to_have_count(3)
    expect(page.get_by_label("Test metric")).to_have_value("balanced_accuracy")
    expect(page.locator("#curve svg")).to_contain_text("0.690")
    rows = page.locator("#models-table tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("Round 2")
    expect(page.locator("#round-phase")).to_have_text("done")
    with page.expect_download() as download:
        page.get_by_role("button", name=f"Download model version {newest}").click()
    assert download.value.suggested_filename == f"coreloop-p{project}-round2-model{newest}.pt"
    saved = download.value.path()
    assert saved.read_bytes() == live.storage.read_bytes(checkpoint)

    page.get_by_role("button", name="Start round").click()
    expect(page.locator("#round-name")).to_have_text("Round 3")
    expect(page.locator("#round-phase")).to_have_text("queued")
    expect(page.get_by_role("button", name="Start round")).to_be_disabled()
    expect(stats.locator("div", has_text="Rounds").locator("dd")).to_have_text("4")
    screenshot("admin", full_page=True)

    rounds = live.get(token, "/rounds", project_id=project)
    assert [(r["number"], r["status"]) for r in rounds][-1] == (3, "queued")

    page.get_by_role("button", name="Cancel round").click()
    expect(page.locator("#round-phase")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Start round")).to_be_enabled()


def test_narrow_screen_layout(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    project = live.project(name="lesions")
    images = live.lesions(project, 1)
    live.queue(project, live.round(project, 0), images)
    _, token = live.user()
    page.set_viewport_size({"width": 390, "height": 844})

    sign_in(page, live, token)
    expect_image(page, images[0])
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    wide = page.evaluate(
        "[...document.querySelectorAll('*')].filter(e => e.getBoundingClientRect().right > "
        "window.innerWidth + 1).map(e => e.tagName + '#' + e.id + '.' + e.className)"
    )
    assert overflow <= 0, wide
    page.keyboard.press("Tab")  # keyboard focus is always visible
    focused = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert focused == "solid"
    screenshot("annotator-mobile", full_page=True)


def _post_label(live: LiveServer, token: str, body: dict[str, Any]) -> None:
    response = httpx.post(
        f"{live.url}/labels", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 201, response.text


def _square(shape: tuple[int, int], x0: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[8:40, x0 : x0 + 32] = True
    return mask


def test_reviewer_sees_the_reads_side_by_side_and_settles(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    """Two readers' masks disagree (Dice 0.25): the reviewer sees both, one colour each, and
    keeps the second; a classification tie is settled with a class button."""
    from app.labels.masks import mask_to_rle

    height, width = 48, 96
    masks = live.project(name="double read", task="segmentation", classes=["lesion"], overlap=2)
    rng = np.random.default_rng(3)
    image = live.image(masks, render_lesion(rng, "melanoma", width).image[24:72])
    classes = live.project(name="double class", overlap=2)
    tied = live.lesions(classes, 1)[0]
    readers = [live.user(name=name)[1] for name in ("dr-ana", "dr-ben")]
    _, reviewer = live.user(Role.reviewer, name="dr-rev")
    for i, (token, x0) in enumerate(zip(readers, (8, 32), strict=True)):
        rle = mask_to_rle(_square((height, width), x0))
        _post_label(live, token, {"image_id": image, "idempotency_key": f"m{i}", "mask_rle": rle})
        _post_label(live, token, {"image_id": tied, "idempotency_key": f"c{i}", "class_index": i})

    page.goto(f"{live.url}/ui")
    page.get_by_label("API token").fill(reviewer)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#project").select_option(label="double read (segmentation)")
    stage = page.locator("#review-stage")
    expect(page.get_by_role("tab", name="Review")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="Annotate")).to_be_hidden()
    expect(stage).to_have_attribute("data-image-id", str(image))
    expect(stage).to_have_attribute("data-state", "ready")
    reads = page.locator("#review-reads li")
    expect(reads).to_have_count(2)
    expect(reads.nth(0)).to_contain_text("dr-ana: mask")
    expect(reads.nth(1)).to_contain_text("dr-ben: mask")
    # Pixels only ana marked are her colour (red), only ben's green, both: drawn over.
    colour = (
        "([x, y]) => Array.from(document.getElementById('review-canvas')"
        ".getContext('2d').getImageData(x, y, 1, 1).data)"
    )

    def near(got: list[int], want: tuple[int, int, int]) -> bool:
        return all(abs(a - b) <= 3 for a, b in zip(got[:3], want, strict=True)) and got[3] > 0

    assert near(page.evaluate(colour, [12, 20]), (0xE6, 0x19, 0x4B))
    assert near(page.evaluate(colour, [60, 20]), (0x3C, 0xB4, 0x4B))
    assert page.evaluate(colour, [90, 20])[3] == 0
    screenshot("reviewer-masks")
    page.get_by_role("button", name="Keep the read of dr-ben (mask)").click()
    expect(stage).to_have_attribute("data-state", "empty")

    page.locator("#project").select_option(label="double class (classification)")
    expect(stage).to_have_attribute("data-image-id", str(tied))
    expect(stage).to_have_attribute("data-state", "ready")
    expect(page.locator("#review-reason")).to_contain_text("The readers disagree")
    page.locator("#review-classes").get_by_role(
        "button", name=SYNTHETIC_CLASSES[2], exact=True
    ).click()
    expect(stage).to_have_attribute("data-state", "empty")

    (settled_mask,) = [
        label for label in labels_of(live, reviewer, image) if label["source"] == "review"
    ]
    got = np.asarray(
        PILImage.open(io.BytesIO(live.get(reviewer, settled_mask["mask_url"]).content))
    )
    assert np.array_equal(got > 0, _square((height, width), 32))
    (settled_class,) = [x for x in labels_of(live, reviewer, tied) if x["source"] == "review"]
    assert settled_class["class_index"] == 2


def _decode_counts(rle: dict[str, Any]) -> np.ndarray:
    """COCO's uncompressed RLE by its definition: alternate runs of 0s and 1s (0s first) over
    the pixels in column-major order."""
    height, width = rle["size"]
    flat = np.zeros(height * width, dtype=bool)
    at = 0
    for k, run in enumerate(rle["counts"]):
        flat[at : at + run] = k % 2 == 1
        at += run
    assert at == height * width
    return flat.reshape(width, height).T


def test_reviewer_edits_a_read_and_settles_with_the_mask(
    page: Page, live: LiveServer, page_errors: list[str], screenshot: Any
) -> None:
    """Two readers' masks disagree: the reviewer opens one read in the editor, cancels, opens
    the other, paints, undoes, erases, and settles with the edited mask (sent as uncompressed
    COCO RLE); the settled label holds exactly that mask."""
    from app.labels.masks import mask_to_rle

    height, width = 48, 96  # not square: a row-major RLE would scramble the mask
    project = live.project(name="edit reads", task="segmentation", classes=["lesion"], overlap=2)
    rng = np.random.default_rng(5)
    image = live.image(project, render_lesion(rng, "melanoma", width).image[24:72])
    readers = [live.user(name=name)[1] for name in ("dr-ana", "dr-ben")]
    _, reviewer = live.user(Role.reviewer, name="dr-rev")
    for i, (token, x0) in enumerate(zip(readers, (8, 32), strict=True)):
        rle = mask_to_rle(_square((height, width), x0))
        _post_label(live, token, {"image_id": image, "idempotency_key": f"m{i}", "mask_rle": rle})
    ana = _square((height, width), 8)

    sign_in(page, live, reviewer)
    stage = page.locator("#review-stage")
    expect(stage).to_have_attribute("data-image-id", str(image))
    expect(stage).to_have_attribute("data-state", "ready")
    coverage = page.locator("#review-mask-coverage")
    reads = {x["author_name"]: x["id"] for x in live.get(reviewer, f"/images/{image}/labels")}
    ana_read, ben_read = reads["dr-ana"], reads["dr-ben"]

    # Open ben's read, paint, and cancel: back to the reads side by side, nothing sent.
    ben_edit = page.get_by_role("button", name="Edit the read of dr-ben (mask)")
    ben_edit.click()
    expect(stage).to_have_attribute("data-editing", str(ben_read))
    expect(page.locator("#review-edit")).to_be_visible()
    expect(page.locator("#review-reads")).to_be_hidden()
    expect(page.locator("#review-edit-source")).to_contain_text("the read of dr-ben")
    expect(page.locator("#announcer")).to_contain_text("Editing the read of dr-ben")
    expect(page.get_by_role("button", name="Brush")).to_be_focused()
    expect(coverage).to_contain_text("(1024 pixels)")
    drag(page, [(70.0, 20.0), (90.0, 20.0)], (width, height), "#review-edit-canvas")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#review-edit")).to_be_hidden()
    expect(page.locator("#review-reads li")).to_have_count(2)
    expect(page.locator("#review-canvas")).to_be_visible()
    expect(ben_edit).to_be_focused()
    expect(page.locator("#announcer")).to_contain_text("Edit cancelled")

    # Ana's read: a stroke undone, a brush stroke below the squares, an eraser cut through hers.
    page.get_by_role("button", name="Edit the read of dr-ana (mask)").click()
    expect(stage).to_have_attribute("data-editing", str(ana_read))
    expect(coverage).to_contain_text("(1024 pixels)")  # starts from her mask, not ben's edit
    radius = 4
    page.keyboard.press("]")  # the default for 96x48 is 2 (min side / 24)
    page.keyboard.press("]")
    expect(page.locator("#review-brush-size-out")).to_have_text(str(radius))
    drag(page, [(70.0, 20.0), (90.0, 20.0)], (width, height), "#review-edit-canvas")
    expect(coverage).not_to_contain_text("(1024 pixels)")
    page.get_by_role("button", name="Undo").click()
    expect(coverage).to_contain_text("(1024 pixels)")
    painted_path = [(66.0, 42.0), (90.0, 42.0)]
    erased = [(20.0, 4.0), (20.0, 44.0)]
    drag(page, painted_path, (width, height), "#review-edit-canvas")
    page.keyboard.press("e")
    expect(page.get_by_role("button", name="Eraser")).to_have_attribute("aria-pressed", "true")
    drag(page, erased, (width, height), "#review-edit-canvas")
    page.mouse.move(10, 10)  # the brush cursor off the canvas for the screenshot
    screenshot("reviewer-edit")
    shown = int(re.search(r"\((\d+) pixels\)", coverage.inner_text()).group(1))  # type: ignore[union-attr]

    with page.expect_request(lambda r: r.url.endswith("/settle") and r.method == "POST") as sent:
        page.get_by_role("button", name="Settle with this mask").click()
    expect(stage).to_have_attribute("data-state", "empty")
    expect(page.get_by_role("button", name="Check again")).to_be_focused()
    body: dict[str, Any] = sent.value.post_data_json or {}
    assert set(body) == {"mask_rle"} and body["mask_rle"]["size"] == [height, width]
    assert all(isinstance(n, int) and n >= 0 for n in body["mask_rle"]["counts"])

    (settled,) = [x for x in labels_of(live, reviewer, image) if x["source"] == "review"]
    with live.sessions() as session:
        item = session.scalars(select(ReviewItem).where(ReviewItem.image_id == image)).one()
        assert (item.state, item.settled_label_id) == ("settled", settled["id"])
    stored = np.asarray(PILImage.open(io.BytesIO(live.get(reviewer, settled["mask_url"]).content)))
    got = stored > 0
    assert got.shape == (height, width)
    # What the page sent, decoded by COCO's definition, is what the server stored, pixel for
    # pixel, and what the page counted.
    assert np.array_equal(_decode_counts(body["mask_rle"]), got)
    assert int(got.sum()) == shown
    # Ana's mask plus the brush stroke, less the eraser's (pointer positions are exact to a
    # fraction of a pixel: check the strokes' cores, and her mask everywhere away from them).
    brush = distance_to_path(got.shape, painted_path)
    eraser = distance_to_path(got.shape, erased)
    assert got[brush <= radius - 1.5].all()
    assert not got[eraser <= radius - 1.5].any()
    away = (brush > radius + 1.5) & (eraser > radius + 1.5)
    assert (got[away] == ana[away]).all()
    assert not ana[brush <= radius - 1.5].any() and ana[eraser <= radius - 1.5].sum() > 100
    # Known pixels (y, x): hers, erased, painted, ben's only, the undone stroke, untouched.
    assert got[20, 10] and got[20, 36] and got[39, 8]
    assert not got[20, 20] and got[42, 80] and not got[20, 50]
    assert not got[20, 80] and not got[0, 0] and not got[47, 0]
