/* coreloop annotator: a static page over the JSON API (no build step, nothing from the network).
 *
 * Auth: an API token kept in localStorage and sent as "Authorization: Bearer" on every call.
 * Annotate: GET /queue leases the next item; a label (POST /labels) or a skip
 * (POST /leases/{id}/skip) moves on. Every label carries an idempotency key that is reused when
 * the same answer is sent again, so a retried click never labels twice.
 * Review (reviewers and admins): GET /review leases an image whose reads disagree and shows
 * them side by side; POST /review/{id}/settle keeps a read, gives a class, sends the image
 * back, or (segmentation) gives a mask edited from one read, as uncompressed COCO RLE.
 * Admin (role "admin"): project stats, rounds (start, live phase, cancel), learning curve (SVG)
 * and model versions.
 */
"use strict";

(() => {
  const TOKEN_KEY = "coreloop.token";
  const PROJECT_KEY = "coreloop.project";
  const ROUND_POLL_MS = 1500;
  const ACTIVE_ROUND = new Set(["queued", "training", "scoring", "selecting"]);
  const PREFERRED_METRICS = {
    classification: ["balanced_accuracy", "accuracy"],
    segmentation: ["dice", "jaccard", "dice_global", "jaccard_global"],
  };
  const MASK_RGBA = [0, 190, 255, 120];
  const UNDO_LIMIT = 30;

  const $ = (id) => document.getElementById(id);

  const state = {
    token: null,
    me: null,
    projects: [],
    project: null, // ProjectDetail
    view: "annotate",
    entry: null, // the QueueEntry being labeled
    image: null, // ImageDetail of the entry
    busy: false,
    generation: 0, // bumps on every project switch or sign-out: late answers are dropped
    photoUrl: null,
    done: { labeled: 0, skipped: 0 },
    review: null, // the ReviewEntry on screen
    reviewImage: null, // its ImageDetail
    reviewUrl: null,
    renewTimer: null,
    roundTimer: null,
    activeRound: null,
    rounds: [],
    models: [],
  };

  // The two mask editors share the drawing code (see "Segmentation"): the annotate view's
  // labels a queued image; the review view's edits one read's mask before settling with it.
  // Each names its elements and holds its mask, ``seg``: {w, h, mask, predicted, undo, tool,
  // radius, version, painting, last}. ``active()``: whether it takes strokes and undo now;
  // ``refresh()``: updates its buttons after a change.
  const editors = {
    annotate: {
      canvas: "mask-canvas", cursor: "brush-cursor", coverage: "mask-coverage",
      brush: "tool-brush", eraser: "tool-eraser", size: "brush-size", sizeOut: "brush-size-out",
      undo: "mask-undo",
      seg: null,
      renderQueued: false,
      active: () => ready(),
      refresh: () => updateSegButtons(),
    },
    review: {
      canvas: "review-edit-canvas", cursor: "review-brush-cursor", coverage: "review-mask-coverage",
      brush: "review-tool-brush", eraser: "review-tool-eraser", size: "review-brush-size",
      sizeOut: "review-brush-size-out", undo: "review-mask-undo",
      seg: null,
      renderQueued: false,
      read: null, // the read being edited; null while the reads are side by side
      trigger: null, // the "Edit this read" button that opened the editor (focused on Cancel)
      busy: false, // loading a read's mask, or settling
      active: () => reviewEditing(),
      refresh: () => updateReviewEditButtons(),
    },
  };

  // ---------------------------------------------------------------------------------------
  // API

  class ApiError extends Error {
    constructor(code, detail, status) {
      super(`${code}: ${detail}`);
      this.code = code;
      this.detail = detail;
      this.status = status;
    }
  }

  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((e) => (e && e.msg ? `${(e.loc || []).join(".")}: ${e.msg}` : JSON.stringify(e)))
        .join("; ");
    }
    return detail == null ? "" : JSON.stringify(detail);
  }

  async function api(path, { method = "GET", json, form, raw = false, token } = {}) {
    const headers = { Authorization: `Bearer ${token || state.token}` };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    }
    let response;
    try {
      response = await fetch(path, { method, headers, body, cache: raw ? "default" : "no-store" });
    } catch (err) {
      throw new ApiError(
        "NetworkError",
        "The server could not be reached. Check the connection and try again; nothing was lost.",
        0,
      );
    }
    if (!response.ok) {
      let code = `HTTP${response.status}`;
      let detail = response.statusText || "The request failed.";
      try {
        const envelope = await response.json();
        if (envelope && envelope.error) code = envelope.error;
        if (envelope && envelope.detail !== undefined) detail = formatDetail(envelope.detail);
      } catch (err) {
        /* not JSON: keep the status line */
      }
      throw new ApiError(code, detail, response.status);
    }
    if (raw) return response;
    return response.status === 204 ? null : response.json();
  }

  async function fetchObjectUrl(path) {
    const response = await api(path, { raw: true });
    return URL.createObjectURL(await response.blob());
  }

  // ---------------------------------------------------------------------------------------
  // Messages

  function showError(err) {
    const known = err instanceof ApiError;
    $("error-code").textContent = known ? `${err.code}:` : "Error:";
    $("error-detail").textContent = known ? err.detail : String(err && err.message ? err.message : err);
    $("error").hidden = false;
    if (known && err.status === 401 && state.me) signOut({ keepError: true });
  }

  function clearError() {
    $("error").hidden = true;
  }

  function announce(text) {
    $("announcer").textContent = text;
  }

  /** Run ``fn``; show any failure in the page. Returns fn's value, or undefined on failure. */
  async function guarded(fn) {
    try {
      return await fn();
    } catch (err) {
      showError(err);
      return undefined;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Idempotency keys

  function uuid4() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    // Not a secure context (plain http on a LAN address): build a v4 UUID by hand.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  /** The same answer for the same lease reuses its key: a retry never labels twice. */
  function keyFor(entry, answer) {
    if (!entry.pending || entry.pending.answer !== answer) {
      entry.pending = { answer, key: uuid4() };
    }
    return entry.pending.key;
  }

  // ---------------------------------------------------------------------------------------
  // Sign in / out

  async function signIn(token) {
    const me = await api("/users/me", { token });
    state.token = token;
    state.me = me;
    localStorage.setItem(TOKEN_KEY, token);
    $("who-name").textContent = me.name;
    $("who-role").textContent = me.role;
    $("who").hidden = false;
    $("signin").hidden = true;
    $("workspace").hidden = false;
    $("tab-admin").hidden = me.role !== "admin";
    $("tab-review").hidden = me.role !== "admin" && me.role !== "reviewer";
    $("tab-annotate").hidden = me.role === "reviewer";
    document.querySelector(".tabs").hidden = me.role === "annotator";
    if (me.role === "reviewer") selectView("review", { focus: false });
    await loadProjects();
  }

  function signOut({ keepError = false } = {}) {
    const entry = state.entry;
    if (entry && state.token) {
      // Give the item back so another annotator can take it now (best effort).
      api(`/leases/${entry.lease_id}/release`, { method: "POST" }).catch(() => {});
    }
    stopTimers();
    state.generation += 1;
    state.token = null;
    state.me = null;
    state.project = null;
    state.entry = null;
    localStorage.removeItem(TOKEN_KEY);
    $("who").hidden = true;
    $("workspace").hidden = true;
    $("signin").hidden = false;
    $("token").value = "";
    if (!keepError) clearError();
    selectView("annotate", { focus: false });
    $("token").focus();
  }

  function stopTimers() {
    clearTimeout(state.renewTimer);
    clearTimeout(state.roundTimer);
    state.renewTimer = null;
    state.roundTimer = null;
  }

  // ---------------------------------------------------------------------------------------
  // Projects

  async function loadProjects() {
    state.projects = await api("/projects");
    const select = $("project");
    select.replaceChildren(
      ...state.projects.map((p) => new Option(`${p.name} (${p.task})`, String(p.id))),
    );
    if (!state.projects.length) {
      setItemTitle("No projects yet", "");
      showEmpty("There are no projects yet. An admin creates one with POST /projects.");
      $("progress-text").textContent = "No project";
      return;
    }
    const saved = localStorage.getItem(PROJECT_KEY);
    const chosen = state.projects.some((p) => String(p.id) === saved) ? saved : String(state.projects[0].id);
    select.value = chosen;
    await selectProject(Number(chosen));
  }

  async function selectProject(projectId) {
    const previous = state.entry;
    if (previous) api(`/leases/${previous.lease_id}/release`, { method: "POST" }).catch(() => {});
    stopTimers();
    state.generation += 1;
    state.entry = null;
    state.done = { labeled: 0, skipped: 0 };
    localStorage.setItem(PROJECT_KEY, String(projectId));
    state.project = await api(`/projects/${projectId}`);
    buildPanels();
    renderProgress();
    updateBanner();
    if (state.view === "admin") await refreshAdmin();
    else if (state.view === "review") await loadReview();
    else await loadNext();
  }

  async function refreshProject() {
    if (!state.project) return;
    const generation = state.generation;
    const project = await api(`/projects/${state.project.id}`);
    if (generation !== state.generation) return;
    state.project = project;
    renderProgress();
  }

  function renderProgress() {
    const p = state.project;
    if (!p) return;
    const c = p.counts;
    const pool = c.images.pool || 0;
    $("progress-text").textContent =
      `Labeled ${c.labeled} of ${pool} pool images · ${c.queued} waiting in the queue` +
      (c.leased ? ` · ${c.leased} being labeled now` : "");
    $("session-text").textContent =
      `This session: ${state.done.labeled} labeled, ${state.done.skipped} skipped`;
    const bar = $("progress-bar");
    bar.max = Math.max(pool, 1);
    bar.value = Math.min(c.labeled, bar.max);
  }

  function isSynthetic() {
    const meta = state.image && state.image.meta;
    const byMeta = Boolean(meta && (meta.synthetic === true || meta.synthetic === "true"));
    const byName = Boolean(state.project && /synthetic/i.test(state.project.name));
    return byMeta || byName;
  }

  function updateBanner() {
    $("synthetic-banner").hidden = !isSynthetic();
  }

  // ---------------------------------------------------------------------------------------
  // Views (tabs)

  function selectView(view, { focus = true } = {}) {
    state.view = view;
    const tabs = { annotate: $("tab-annotate"), review: $("tab-review"), admin: $("tab-admin") };
    for (const [name, tab] of Object.entries(tabs)) {
      const selected = name === view;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`view-${name}`).hidden = !selected;
    }
    if (focus) tabs[view].focus();
    clearTimeout(state.roundTimer);
    if (!state.project) return;
    if (view === "admin") guarded(refreshAdmin);
    else if (view === "review") guarded(loadReview);
    else if (!state.entry) guarded(loadNext);
  }

  function onTabKey(event) {
    if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
    const shown = ["annotate", "review", "admin"].filter((v) => !$(`tab-${v}`).hidden);
    if (shown.length < 2) return;
    event.preventDefault();
    const step = event.key === "ArrowRight" ? 1 : shown.length - 1;
    selectView(shown[(shown.indexOf(state.view) + step) % shown.length]);
  }

  // ---------------------------------------------------------------------------------------
  // Review: the reads of one image side by side (reviewers and admins)

  const READ_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"];

  async function loadReview() {
    const p = state.project;
    if (!p) return;
    closeReviewEditor();
    const generation = state.generation;
    const entries = await api(`/review?project_id=${p.id}&limit=1`);
    if (generation !== state.generation) return;
    const entry = entries[0] || null;
    state.review = entry;
    state.reviewImage = null;
    $("review-stage").dataset.state = entry ? "loading" : "empty";
    if (!entry) {
      $("review-box").hidden = true;
      $("review-empty").hidden = false;
      $("review-title").textContent = "Review";
      $("review-meta").textContent = "";
      $("review-reason").textContent = "";
      $("review-reads").replaceChildren();
      $("review-classes-wrap").hidden = true;
      $("review-send-back").disabled = true;
      $("review-skip").disabled = true;
      return;
    }
    const [image, url] = await Promise.all([api(`/images/${entry.image_id}`), fetchObjectUrl(entry.image_url)]);
    if (generation !== state.generation) {
      URL.revokeObjectURL(url);
      return;
    }
    const photo = $("review-photo");
    if (state.reviewUrl) URL.revokeObjectURL(state.reviewUrl);
    state.reviewUrl = url;
    photo.src = url;
    photo.alt = `Image ${image.id} (${image.filename}) under review`;
    state.reviewImage = image;
    await photo.decode().catch(() => {});
    $("review-box").hidden = false;
    sizeStage(image.width, image.height, "review-box");
    $("review-title").textContent = `Image #${image.id}`;
    $("review-meta").textContent = `${image.filename} · ${image.width}×${image.height}`;
    const predicted = entry.detail && Number.isInteger(entry.detail.predicted) ? state.project.classes[entry.detail.predicted] : null;
    $("review-reason").textContent =
      entry.reason === "disputed" ? "The readers disagree: keep one read, or settle it yourself." :
      entry.reason === "suspect" ? `The readers agree, but the model says ${predicted} (confidence ${fmt(entry.detail.confidence)}): keep a read or settle it.` :
      "Spot check of an agreed image: keep the read you trust.";
    const segmentation = state.project.task === "segmentation";
    $("review-reads").replaceChildren(...entry.reads.map((read, i) => readItem(read, i, segmentation)));
    $("review-classes-wrap").hidden = segmentation;
    if (!segmentation) {
      $("review-classes").replaceChildren(...state.project.classes.map((name, index) => {
        const button = document.createElement("button");
        button.type = "button";
        button.className = "btn";
        button.textContent = name;
        button.addEventListener("click", () => guarded(() => settleReview({ class_index: index }, name)));
        return button;
      }));
    }
    await drawReadMasks(entry, image, segmentation, generation);
    $("review-empty").hidden = true;
    $("review-box").hidden = false;
    $("review-send-back").disabled = false;
    $("review-skip").disabled = false;
    $("review-stage").dataset.imageId = String(image.id);
    $("review-stage").dataset.state = "ready";
    announce(`Image ${image.id}: ${entry.reads.length} reads to review.`);
  }

  function readItem(read, i, segmentation) {
    const li = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = READ_COLOURS[i % READ_COLOURS.length];
    swatch.setAttribute("aria-hidden", "true");
    const text = document.createElement("span");
    const what = segmentation ? "mask" : read.class_name ?? "–";
    text.textContent = `${read.author_name ?? "reader"}: ${what}`;
    const keep = document.createElement("button");
    keep.type = "button";
    keep.className = "btn small";
    keep.textContent = "Keep this read";
    keep.setAttribute("aria-label", `Keep the read of ${read.author_name ?? "this reader"} (${what})`);
    keep.addEventListener("click", () => guarded(() => settleReview({ label_id: read.label_id }, what)));
    const actions = document.createElement("span");
    actions.className = "read-actions";
    actions.append(keep);
    li.append(swatch, text, actions);
    if (segmentation && read.mask_url) {
      const edit = document.createElement("button");
      edit.type = "button";
      edit.className = "btn small";
      edit.textContent = "Edit this read";
      edit.setAttribute("aria-label", `Edit the read of ${read.author_name ?? "this reader"} (${what})`);
      edit.addEventListener("click", () => guarded(() => editRead(read, edit)));
      actions.append(edit);
    }
    return li;
  }

  async function drawReadMasks(entry, image, segmentation, generation) {
    const canvas = $("review-canvas");
    canvas.hidden = !segmentation;
    if (!segmentation) return;
    canvas.width = image.width;
    canvas.height = image.height;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    for (const [i, read] of entry.reads.entries()) {
      if (!read.mask_url) continue;
      const url = await fetchObjectUrl(read.mask_url);
      if (generation !== state.generation) return URL.revokeObjectURL(url);
      const mask = new Image();
      mask.src = url;
      await mask.decode().catch(() => {});
      // The mask (white on black) tinted with the reader's colour, half transparent.
      const layer = document.createElement("canvas");
      layer.width = canvas.width;
      layer.height = canvas.height;
      const lctx = layer.getContext("2d");
      lctx.drawImage(mask, 0, 0, layer.width, layer.height);
      const pixels = lctx.getImageData(0, 0, layer.width, layer.height);
      const [r, g, b] = READ_COLOURS[i % READ_COLOURS.length].match(/\w\w/g).map((h) => parseInt(h, 16));
      for (let k = 0; k < pixels.data.length; k += 4) {
        const on = pixels.data[k] > 127;
        pixels.data[k] = r;
        pixels.data[k + 1] = g;
        pixels.data[k + 2] = b;
        pixels.data[k + 3] = on ? 110 : 0;
      }
      lctx.putImageData(pixels, 0, 0);
      ctx.drawImage(layer, 0, 0);
      URL.revokeObjectURL(url);
    }
  }

  async function settleReview(body, describe) {
    const entry = state.review;
    if (!entry) return;
    await api(`/review/${entry.id}/settle`, { method: "POST", json: body });
    announce(body.send_back ? `Image ${entry.image_id} sent back for another read.` : `Image ${entry.image_id} settled: ${describe}.`);
    await loadReview();
  }

  async function skipReview() {
    const entry = state.review;
    if (!entry) return;
    await api(`/review/${entry.id}/skip`, { method: "POST" });
    announce(`Image ${entry.image_id} skipped.`);
    await loadReview();
  }

  // ---------------------------------------------------------------------------------------
  // Review: edit one read's mask (brush, eraser, undo) and settle with the result

  function reviewEditing() {
    const ed = editors.review;
    return Boolean(ed.read && ed.seg) && !ed.busy;
  }

  function updateReviewEditButtons() {
    const ed = editors.review;
    const on = reviewEditing();
    $("review-mask-undo").setAttribute("aria-disabled", String(!on || !ed.seg.undo.length));
    $("review-edit-settle").setAttribute("aria-disabled", String(!on));
    $("review-edit-cancel").setAttribute("aria-disabled", String(ed.busy));
  }

  /** Open the editor on the review stage, starting from ``read``'s mask. */
  async function editRead(read, trigger) {
    const entry = state.review;
    const image = state.reviewImage;
    const ed = editors.review;
    if (!entry || !image || !read.mask_url || ed.busy) return;
    const generation = state.generation;
    ed.busy = true;
    let mask;
    try {
      mask = await loadMask(read.mask_url, image.width, image.height);
    } finally {
      ed.busy = false;
    }
    if (generation !== state.generation || state.review !== entry) return;
    resetEditor(ed, image.width, image.height);
    ed.seg.mask.set(mask);
    ed.read = read;
    ed.trigger = trigger;
    const who = read.author_name ?? "this reader";
    const strong = document.createElement("strong");
    strong.textContent = `the read of ${who}`;
    $("review-edit-source").replaceChildren(
      "Starting from ", strong, ". Paint what it missed and erase what it should not hold, then settle with the mask.",
    );
    $("review-side").hidden = true;
    $("review-edit").hidden = false;
    $("review-panel").setAttribute("aria-label", "Edit the mask");
    $("review-canvas").hidden = true;
    $(ed.canvas).hidden = false;
    $("review-stage").dataset.editing = String(read.label_id);
    renderMask(ed);
    updateReviewEditButtons();
    $(ed.seg.tool === "eraser" ? ed.eraser : ed.brush).focus();
    announce(`Editing the read of ${who} on image ${entry.image_id}: paint with the brush, erase with the eraser, then settle with the mask.`);
  }

  /** Back to the reads side by side (``restoreFocus``: on the button that opened the editor). */
  function closeReviewEditor({ restoreFocus = false } = {}) {
    const ed = editors.review;
    if (!ed.read) return;
    const trigger = ed.trigger;
    ed.read = null;
    ed.trigger = null;
    if (ed.seg) ed.seg.painting = false;
    $("review-edit").hidden = true;
    $("review-side").hidden = false;
    $("review-panel").setAttribute("aria-label", "Reads");
    $(ed.canvas).hidden = true;
    $(ed.cursor).hidden = true;
    $("review-canvas").hidden = false; // only a segmentation item opens the editor
    delete $("review-stage").dataset.editing;
    if (restoreFocus && trigger && trigger.isConnected) trigger.focus();
  }

  function cancelReviewEdit() {
    const ed = editors.review;
    if (!ed.read || ed.busy) return;
    closeReviewEditor({ restoreFocus: true });
    announce("Edit cancelled: the reads are side by side again.");
  }

  async function settleWithMask() {
    const ed = editors.review;
    if (!reviewEditing()) return;
    const who = ed.read.author_name ?? "this reader";
    ed.busy = true;
    updateReviewEditButtons();
    try {
      await settleReview({ mask_rle: maskRle(ed.seg) }, `the read of ${who}, edited`);
    } finally {
      ed.busy = false;
      if (ed.read) updateReviewEditButtons();
    }
    // The next item is on screen (or none): focus its first read, or "Check again".
    const next = $("review-reads").querySelector("button") || $("review-refresh");
    if (!next.closest("[hidden]")) next.focus();
  }

  // ---------------------------------------------------------------------------------------
  // The queue

  function setItemTitle(title, meta) {
    $("item-title").textContent = title;
    $("item-meta").textContent = meta;
  }

  function showEmpty(text) {
    $("stage").dataset.state = "empty";
    delete $("stage").dataset.imageId;
    $("stage-box").hidden = true;
    $("empty").hidden = false;
    $("empty-text").textContent = text;
    setActionsEnabled(false);
  }

  function setActionsEnabled(enabled) {
    const panel = document.querySelector(".panel");
    for (const button of panel.querySelectorAll("button.btn")) {
      button.setAttribute("aria-disabled", String(!enabled));
    }
  }

  function ready() {
    return Boolean(state.entry) && !state.busy && $("stage").dataset.state === "ready";
  }

  async function loadNext() {
    if (!state.project) return;
    const generation = state.generation;
    const project = state.project;
    clearTimeout(state.renewTimer);
    state.entry = null;
    state.image = null;
    state.busy = true;
    $("stage").dataset.state = "loading";
    setActionsEnabled(false);
    try {
      const entries = await api(`/queue?project_id=${project.id}&limit=1`);
      if (generation !== state.generation) return;
      if (!entries.length) {
        setItemTitle("All done for now", "");
        showEmpty(
          "Nothing to label right now: every queued image of this project is labeled or being " +
            "labeled. An admin starts the next round to queue more.",
        );
        updateBanner();
        refreshProject().catch(showError);
        return;
      }
      await showEntry(entries[0], generation);
    } finally {
      if (generation === state.generation) state.busy = false;
    }
  }

  async function showEntry(entry, generation) {
    const [image, url] = await Promise.all([
      api(`/images/${entry.image_id}`),
      fetchObjectUrl(entry.image_url),
    ]);
    if (generation !== state.generation) {
      URL.revokeObjectURL(url);
      return;
    }
    const photo = $("photo");
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = url;
    photo.src = url;
    photo.alt = `Image ${image.id} (${image.filename}) to label`;
    await photo.decode().catch(() => {});
    sizeStage(image.width, image.height);
    state.entry = entry;
    state.image = image;
    if (state.project.task === "segmentation") await setupMask(entry, image, generation);
    else renderSuggestion(entry);
    if (generation !== state.generation) return;
    const modelNote = entry.prediction ? ` · model v${entry.prediction.model_version_id}` : "";
    setItemTitle(
      `Image #${image.id}`,
      `${image.filename} · ${image.width}×${image.height} · round ${entry.round}, rank ${entry.rank}${modelNote}`,
    );
    $("empty").hidden = true;
    $("stage-box").hidden = false;
    $("stage").dataset.imageId = String(image.id);
    $("stage").dataset.state = "ready";
    setActionsEnabled(true);
    if (state.project.task === "segmentation") updateSegButtons();
    updateBanner();
    scheduleRenew(entry);
    announce(`Image ${image.id} ready to label.`);
  }

  function sizeStage(width, height, boxId = "stage-box") {
    const box = $(boxId);
    const ratio = width / height;
    box.style.aspectRatio = `${width} / ${height}`;
    // As wide as the column allows, and short enough to keep the tools and the whole image in
    // view (the header and progress take about 340 px).
    const tallest = "max(240px, 100vh - 340px)";
    box.style.width = `min(100%, calc(${tallest} * ${ratio.toFixed(4)}), ${Math.max(width, 640)}px)`;
  }

  /** Renew the lease halfway to its expiry while the image is on screen. */
  function scheduleRenew(entry) {
    clearTimeout(state.renewTimer);
    const left = new Date(entry.expires_at).getTime() - Date.now();
    const wait = Math.max(5000, left / 2);
    state.renewTimer = setTimeout(async () => {
      if (state.entry !== entry) return;
      try {
        const lease = await api(`/leases/${entry.lease_id}/renew`, { method: "POST" });
        entry.expires_at = lease.expires_at;
        scheduleRenew(entry);
      } catch (err) {
        showError(err);
      }
    }, wait);
  }

  /** After a lease error the item is gone from us: show the error and fetch the next one. */
  function leaseGone(err) {
    return err instanceof ApiError && ["LeaseExpired", "LeaseNotActive", "LeaseNotYours", "LeaseNotFound"].includes(err.code);
  }

  async function submitLabel(body, describe) {
    if (!ready()) return;
    const entry = state.entry;
    state.busy = true;
    setActionsEnabled(false);
    try {
      const label = await api("/labels", body);
      clearError();
      state.done.labeled += 1;
      announce(`Labeled image ${label.image_id}${describe ? ` as ${describe}` : ""}.`);
      state.busy = false;
      await loadNext();
      await refreshProject();
    } catch (err) {
      state.busy = false;
      showError(err);
      if (leaseGone(err)) await guarded(loadNext);
      else if (state.entry === entry) setActionsEnabled(true);
    }
  }

  async function skip() {
    if (!ready()) return;
    const entry = state.entry;
    state.busy = true;
    setActionsEnabled(false);
    try {
      await api(`/leases/${entry.lease_id}/skip`, { method: "POST" });
      clearError();
      state.done.skipped += 1;
      announce(`Skipped image ${entry.image_id}.`);
      state.busy = false;
      await loadNext();
      await refreshProject();
    } catch (err) {
      state.busy = false;
      showError(err);
      if (leaseGone(err)) await guarded(loadNext);
      else if (state.entry === entry) setActionsEnabled(true);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Classification

  function buildPanels() {
    const p = state.project;
    const seg = p.task === "segmentation";
    $("cls-panel").hidden = seg;
    $("seg-panel").hidden = !seg;
    $("mask-canvas").hidden = !seg;
    const buttons = p.classes.map((name, index) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "btn class-btn";
      button.dataset.index = String(index);
      const bar = document.createElement("span");
      bar.className = "bar";
      const label = document.createElement("span");
      label.className = "name";
      label.textContent = name;
      const prob = document.createElement("span");
      prob.className = "prob";
      const parts = [bar];
      if (index < 9) {
        const kbd = document.createElement("kbd");
        kbd.textContent = String(index + 1);
        parts.push(kbd);
        button.setAttribute("aria-keyshortcuts", String(index + 1));
      }
      parts.push(label, prob);
      button.append(...parts);
      button.addEventListener("click", () => labelClass(index));
      return button;
    });
    $("class-buttons").replaceChildren(...buttons);
    renderHints();
  }

  function renderHints() {
    const seg = state.project.task === "segmentation";
    const n = Math.min(state.project.classes.length, 9);
    const hints = seg
      ? [
          ["B", "brush"], ["E", "eraser"], ["[ ]", "smaller / larger brush"],
          ["P", "start again from the prediction"], ["C", "clear the mask"],
          ["Ctrl+Z", "undo a stroke"], ["Enter", "submit the mask"], ["S", "skip this image"],
        ]
      : [
          [n > 1 ? `1–${n}` : "1", "label with that class"],
          ["A", "accept the model's suggestion"],
          ["S", "skip this image"],
        ];
    $("hint-list").replaceChildren(
      ...hints.map(([keys, what]) => {
        const li = document.createElement("li");
        const kbd = document.createElement("kbd");
        kbd.textContent = keys;
        li.append(kbd, ` ${what}`);
        return li;
      }),
    );
  }

  function suggestedIndex(entry) {
    const probs = entry && entry.prediction && entry.prediction.class_probs;
    if (!probs || !probs.length) return -1;
    let best = 0;
    probs.forEach((v, i) => {
      if (v > probs[best]) best = i;
    });
    return best;
  }

  function renderSuggestion(entry) {
    const probs = (entry.prediction && entry.prediction.class_probs) || null;
    const best = suggestedIndex(entry);
    for (const button of $("class-buttons").children) {
      const index = Number(button.dataset.index);
      const p = probs && probs[index] != null ? probs[index] : null;
      button.querySelector(".prob").textContent = p == null ? "" : `${Math.round(p * 100)}%`;
      button.querySelector(".bar").style.width = p == null ? "0" : `${(p * 100).toFixed(1)}%`;
      button.classList.toggle("suggested", index === best);
    }
    const out = $("suggestion");
    out.replaceChildren();
    if (best < 0) {
      out.textContent = "No model suggestion for this image yet.";
      return;
    }
    const strong = document.createElement("strong");
    strong.textContent = state.project.classes[best];
    out.append("The model suggests ", strong, ` (${Math.round(probs[best] * 100)}%). Press A to accept.`);
  }

  function labelClass(index) {
    if (!ready()) return;
    const entry = state.entry;
    const classes = state.project.classes;
    if (index < 0 || index >= classes.length) return;
    submitLabel(
      {
        method: "POST",
        json: {
          image_id: entry.image_id,
          lease_id: entry.lease_id,
          idempotency_key: keyFor(entry, `class:${index}`),
          class_index: index,
        },
      },
      classes[index],
    );
  }

  // ---------------------------------------------------------------------------------------
  // Segmentation: the mask is a Uint8Array (1 = lesion) at the image's own resolution. The
  // drawing code takes the editor it works on (see ``editors``): the annotate view's or the
  // review view's.

  /** A new, empty w x h mask for ``ed``; its tool, and its radius for the same width, stay. */
  function resetEditor(ed, w, h) {
    const canvas = $(ed.canvas);
    canvas.width = w;
    canvas.height = h;
    const radius = Math.max(1, Math.round(Math.min(w, h) / 24));
    const slider = $(ed.size);
    slider.max = String(Math.max(8, Math.round(Math.min(w, h) / 4)));
    const previous = ed.seg;
    ed.seg = {
      w, h,
      mask: new Uint8Array(w * h),
      predicted: null,
      undo: [],
      tool: previous ? previous.tool : "brush",
      radius: previous && previous.w === w ? previous.radius : radius,
      version: 0,
      painting: false,
      last: null,
    };
    setRadius(ed, ed.seg.radius);
    setTool(ed, ed.seg.tool);
  }

  async function setupMask(entry, image, generation) {
    const ed = editors.annotate;
    const w = image.width;
    const h = image.height;
    resetEditor(ed, w, h);
    const maskUrl = entry.prediction && entry.prediction.mask_url;
    if (maskUrl) {
      try {
        ed.seg.predicted = await loadMask(maskUrl, w, h);
        if (generation !== state.generation) return;
        ed.seg.mask.set(ed.seg.predicted);
      } catch (err) {
        showError(err);
      }
    }
    $("seg-source").replaceChildren();
    if (ed.seg.predicted) {
      const strong = document.createElement("strong");
      strong.textContent = "the model's predicted mask";
      $("seg-source").append("Starting from ", strong, ". Correct it with the brush and eraser, or submit it as it is.");
    } else {
      $("seg-source").textContent = "No predicted mask for this image: paint the lesion with the brush.";
    }
    renderMask(ed);
  }

  /** A stored mask (a PNG, white on black) as a w x h Uint8Array: 1 where it is above 127. */
  async function loadMask(path, w, h) {
    const response = await api(path, { raw: true });
    const bitmap = await createImageBitmap(await response.blob());
    const scratch = document.createElement("canvas");
    scratch.width = w;
    scratch.height = h;
    const ctx = scratch.getContext("2d", { willReadFrequently: true });
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bitmap, 0, 0, w, h);
    const rgba = ctx.getImageData(0, 0, w, h).data;
    const mask = new Uint8Array(w * h);
    for (let i = 0; i < mask.length; i += 1) mask[i] = rgba[i * 4] > 127 ? 1 : 0;
    return mask;
  }

  function renderMask(ed) {
    ed.renderQueued = false;
    const seg = ed.seg;
    if (!seg) return;
    const ctx = $(ed.canvas).getContext("2d");
    const pixels = ctx.createImageData(seg.w, seg.h);
    const out = pixels.data;
    const [r, g, b, a] = MASK_RGBA;
    let painted = 0;
    for (let i = 0; i < seg.mask.length; i += 1) {
      if (!seg.mask[i]) continue;
      painted += 1;
      const o = i * 4;
      out[o] = r;
      out[o + 1] = g;
      out[o + 2] = b;
      out[o + 3] = a;
    }
    ctx.putImageData(pixels, 0, 0);
    const share = (100 * painted) / seg.mask.length;
    $(ed.coverage).textContent = `The mask covers ${share.toFixed(1)}% of the image (${painted} pixels).`;
  }

  function queueRender(ed) {
    if (ed.renderQueued) return;
    ed.renderQueued = true;
    requestAnimationFrame(() => renderMask(ed));
  }

  function setTool(ed, tool) {
    if (!ed.seg) return;
    ed.seg.tool = tool;
    $(ed.brush).setAttribute("aria-pressed", String(tool === "brush"));
    $(ed.eraser).setAttribute("aria-pressed", String(tool === "eraser"));
  }

  function setRadius(ed, radius) {
    const slider = $(ed.size);
    const value = Math.max(Number(slider.min), Math.min(Number(slider.max), Math.round(radius)));
    slider.value = String(value);
    $(ed.sizeOut).textContent = String(value);
    if (ed.seg) ed.seg.radius = value;
  }

  function pushUndo(seg) {
    seg.undo.push(seg.mask.slice());
    if (seg.undo.length > UNDO_LIMIT) seg.undo.shift();
  }

  function changed(ed) {
    ed.seg.version += 1;
    ed.refresh();
    queueRender(ed);
  }

  function updateSegButtons() {
    const seg = editors.annotate.seg;
    const on = ready();
    $("mask-undo").setAttribute("aria-disabled", String(!on || !seg || !seg.undo.length));
    $("mask-reset").setAttribute("aria-disabled", String(!on || !seg || !seg.predicted));
  }

  /** Set every pixel whose centre lies within the brush disc around (x, y) (image pixels). */
  function stamp(seg, x, y) {
    const r = seg.radius;
    const value = seg.tool === "brush" ? 1 : 0;
    const x0 = Math.max(0, Math.floor(x - r));
    const x1 = Math.min(seg.w - 1, Math.ceil(x + r));
    const y0 = Math.max(0, Math.floor(y - r));
    const y1 = Math.min(seg.h - 1, Math.ceil(y + r));
    const r2 = r * r;
    for (let j = y0; j <= y1; j += 1) {
      const dy = j + 0.5 - y;
      for (let i = x0; i <= x1; i += 1) {
        const dx = i + 0.5 - x;
        if (dx * dx + dy * dy <= r2) seg.mask[j * seg.w + i] = value;
      }
    }
  }

  function strokeTo(seg, from, to) {
    const steps = Math.max(1, Math.ceil(Math.hypot(to.x - from.x, to.y - from.y) / Math.max(0.5, seg.radius / 2)));
    for (let s = 1; s <= steps; s += 1) {
      const t = s / steps;
      stamp(seg, from.x + (to.x - from.x) * t, from.y + (to.y - from.y) * t);
    }
  }

  function toImage(ed, event) {
    const rect = $(ed.canvas).getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) / rect.width) * ed.seg.w,
      y: ((event.clientY - rect.top) / rect.height) * ed.seg.h,
    };
  }

  function moveCursor(ed, event) {
    const seg = ed.seg;
    const cursor = $(ed.cursor);
    if (!seg) return;
    const rect = $(ed.canvas).getBoundingClientRect();
    const size = Math.max(4, ((2 * seg.radius) / seg.w) * rect.width);
    cursor.style.width = `${size}px`;
    cursor.style.height = `${size}px`;
    cursor.style.left = `${event.clientX - rect.left}px`;
    cursor.style.top = `${event.clientY - rect.top}px`;
    cursor.hidden = false;
  }

  function onPointerDown(ed, event) {
    if (!ed.active() || !ed.seg || event.button !== 0) return;
    event.preventDefault();
    $(ed.canvas).setPointerCapture(event.pointerId);
    const seg = ed.seg;
    pushUndo(seg);
    seg.painting = true;
    seg.last = toImage(ed, event);
    stamp(seg, seg.last.x, seg.last.y);
    queueRender(ed);
  }

  function onPointerMove(ed, event) {
    moveCursor(ed, event);
    const seg = ed.seg;
    if (!seg || !seg.painting) return;
    const point = toImage(ed, event);
    strokeTo(seg, seg.last, point);
    seg.last = point;
    queueRender(ed);
  }

  function onPointerUp(ed) {
    const seg = ed.seg;
    if (!seg || !seg.painting) return;
    seg.painting = false;
    seg.last = null;
    changed(ed);
  }

  function undo(ed) {
    const seg = ed.seg;
    if (!ed.active() || !seg || !seg.undo.length) return;
    seg.mask = seg.undo.pop();
    changed(ed);
  }

  function resetToPrediction(ed) {
    const seg = ed.seg;
    if (!ed.active() || !seg || !seg.predicted) return;
    pushUndo(seg);
    seg.mask.set(seg.predicted);
    changed(ed);
  }

  function clearMask(ed) {
    const seg = ed.seg;
    if (!ed.active() || !seg) return;
    pushUndo(seg);
    seg.mask.fill(0);
    changed(ed);
  }

  /** The mask as an 8-bit PNG holding 0 and 255 (grey: the three colour channels agree). */
  function maskPng(seg) {
    const canvas = document.createElement("canvas");
    canvas.width = seg.w;
    canvas.height = seg.h;
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(seg.w, seg.h);
    const out = pixels.data;
    for (let i = 0; i < seg.mask.length; i += 1) {
      const v = seg.mask[i] ? 255 : 0;
      const o = i * 4;
      out[o] = v;
      out[o + 1] = v;
      out[o + 2] = v;
      out[o + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    return new Promise((resolve, reject) => {
      canvas.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("The mask could not be encoded as PNG."))), "image/png");
    });
  }

  /** The mask as COCO's uncompressed RLE, ``{size: [h, w], counts}``: run lengths in
   * column-major order (x outer, y inner), alternately of 0s and 1s, the first of 0s (maybe
   * an empty one). */
  function maskRle(seg) {
    const counts = [];
    let value = 0;
    let run = 0;
    for (let x = 0; x < seg.w; x += 1) {
      for (let i = x; i < seg.mask.length; i += seg.w) {
        if (seg.mask[i] !== value) {
          counts.push(run);
          value = seg.mask[i];
          run = 0;
        }
        run += 1;
      }
    }
    counts.push(run);
    return { size: [seg.h, seg.w], counts };
  }

  async function submitMask() {
    const seg = editors.annotate.seg;
    if (!ready() || !seg) return;
    const entry = state.entry;
    const form = new FormData();
    form.append("image_id", String(entry.image_id));
    form.append("lease_id", String(entry.lease_id));
    form.append("idempotency_key", keyFor(entry, `mask:${seg.version}`));
    form.append("mask", await maskPng(seg), "mask.png");
    await submitLabel({ method: "POST", form }, "");
  }

  // ---------------------------------------------------------------------------------------
  // Keyboard

  /** The keys both mask editors share: B, E, [ and ]. */
  function brushKeys(ed) {
    return {
      b: () => setTool(ed, "brush"),
      e: () => setTool(ed, "eraser"),
      "[": () => setRadius(ed, ed.seg.radius - 1),
      "]": () => setRadius(ed, ed.seg.radius + 1),
    };
  }

  function onKey(event) {
    if (!state.project || $("workspace").hidden) return;
    if (state.view === "review") {
      onReviewKey(event);
      return;
    }
    if (state.view !== "annotate") return;
    const target = event.target;
    if (target && target.closest && target.closest("input, select, textarea, [role='tab']")) return;
    const key = event.key;
    const seg = state.project.task === "segmentation";
    const ed = editors.annotate;
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "z" && seg) {
      event.preventDefault();
      undo(ed);
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const lower = key.toLowerCase();
    if (lower === "s") {
      event.preventDefault();
      skip();
      return;
    }
    if (!seg) {
      if (/^[1-9]$/.test(key)) {
        event.preventDefault();
        labelClass(Number(key) - 1);
      } else if (lower === "a" && state.entry && suggestedIndex(state.entry) >= 0) {
        event.preventDefault();
        labelClass(suggestedIndex(state.entry));
      }
      return;
    }
    const actions = {
      ...brushKeys(ed),
      p: () => resetToPrediction(ed),
      c: () => clearMask(ed),
    };
    if (key === "Enter") {
      if (target && target.closest && target.closest("button, a, summary")) return; // activates it
      event.preventDefault();
      guarded(submitMask);
    } else if (actions[lower] && ed.seg) {
      event.preventDefault();
      actions[lower]();
    }
  }

  /** The review view's mask editor: B, E, [ ], Ctrl+Z as in the annotate view; Escape cancels. */
  function onReviewKey(event) {
    const ed = editors.review;
    if (!ed.read) return;
    const target = event.target;
    const inField = Boolean(target && target.closest && target.closest("input, select, textarea, [role='tab']"));
    if (event.key === "Escape" && !(target && target.closest && target.closest("select"))) {
      event.preventDefault();
      cancelReviewEdit();
      return;
    }
    if (inField) return;
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo(ed);
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const action = brushKeys(ed)[event.key.toLowerCase()];
    if (action) {
      event.preventDefault();
      action();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Admin

  async function refreshAdmin() {
    const p = state.project;
    if (!p || !state.me || state.me.role !== "admin") return;
    const generation = state.generation;
    const [project, rounds, models, members, agreement] = await Promise.all([
      api(`/projects/${p.id}`),
      api(`/rounds?project_id=${p.id}`),
      api(`/projects/${p.id}/models`),
      api(`/projects/${p.id}/members`),
      // Agreement compares reads: only projects with several readers have any.
      p.overlap >= 2 ? api(`/projects/${p.id}/agreement`) : Promise.resolve(null),
    ]);
    if (generation !== state.generation) return;
    state.project = project;
    state.rounds = rounds;
    state.models = models;
    renderProgress();
    renderStats();
    renderReaders(members, agreement);
    renderMetricChoices();
    renderCurve();
    renderModels();
    const active = rounds.find((r) => ACTIVE_ROUND.has(r.status));
    const latest = active || rounds[rounds.length - 1] || null;
    showRound(latest);
    if (active) pollRound(active.id, generation);
  }

  function renderStats() {
    const p = state.project;
    const c = p.counts;
    const budget = Number.isInteger(p.budget) ? `${p.budget} images` : `${Math.round(p.budget * 100)}% of the pool`;
    const facts = [
      ["Task", p.task],
      ["Classes", p.classes.join(", ")],
      ["Strategy", `${p.strategy.replaceAll("_", " ")} (α ${p.alpha})`],
      ["Budget per round", budget],
    ];
    $("facts").replaceChildren(...facts.map(([name, value]) => term("div", name, value)));
    const counts = [
      ["Pool images", c.images.pool || 0],
      ["Val images", c.images.val || 0],
      ["Test images", c.images.test || 0],
      ["Labeled", c.labeled],
      ["In the queue", c.queued],
      ["Leased now", c.leased],
      ["Rounds", c.rounds],
    ];
    $("stats").replaceChildren(...counts.map(([name, value]) => term("div", name, value)));
  }

  function term(tag, name, value) {
    const wrap = document.createElement(tag);
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    wrap.append(dt, dd);
    return wrap;
  }

  function showRound(round) {
    state.activeRound = round && ACTIVE_ROUND.has(round.status) ? round : null;
    $("round-start").disabled = Boolean(state.activeRound);
    $("round-cancel").hidden = !state.activeRound || round.cancel_requested;
    if (!round) {
      $("round-status").hidden = true;
      return;
    }
    $("round-status").hidden = false;
    $("round-name").textContent = `Round ${round.number}`;
    const phase = $("round-phase");
    const phaseName = round.progress && round.progress.phase && round.status !== "done" ? round.progress.phase : round.status;
    phase.textContent = round.cancel_requested && ACTIVE_ROUND.has(round.status) ? `${phaseName} (cancelling)` : phaseName;
    phase.className = `phase ${round.status}`;
    const fraction = progressFraction(round);
    const bar = $("round-progress");
    if (round.status === "done") {
      bar.value = 1;
    } else if (fraction == null) {
      bar.removeAttribute("value"); // indeterminate
    } else {
      bar.value = fraction;
    }
    $("round-detail").textContent = roundDetail(round);
  }

  function progressFraction(round) {
    const p = round.progress || {};
    if (p.epochs && p.epoch != null) return Math.min(1, p.epoch / p.epochs);
    if (p.total && p.scored != null) return Math.min(1, p.scored / p.total);
    if (p.total && p.loaded != null) return Math.min(1, p.loaded / p.total);
    return null;
  }

  function roundDetail(round) {
    const p = round.progress || {};
    if (round.status === "failed") return `Failed: ${round.error || "no error recorded"}`;
    if (round.status === "queued") {
      return "Waiting for a worker to pick it up (the worker trains, scores the pool, then queues the next batch).";
    }
    if (round.status === "done") {
      const metric = pickMetric(round.test_metrics);
      const shown = metric ? ` · test ${metric} ${fmt(round.test_metrics[metric])}` : "";
      return `Done: trained on ${round.labeled_count ?? "?"} labels${shown}.`;
    }
    if (round.status === "cancelled") return "Cancelled.";
    const parts = [];
    if (p.step) parts.push(p.step);
    if (p.epochs) parts.push(`epoch ${p.epoch ?? 0} of ${p.epochs}`);
    if (p.total && p.scored != null) parts.push(`${p.scored} of ${p.total} pool images scored`);
    if (p.total && p.loaded != null) parts.push(`${p.loaded} of ${p.total} images loaded`);
    if (p.budget) parts.push(`selecting ${p.budget}`);
    return parts.join(" · ");
  }

  function pollRound(roundId, generation) {
    clearTimeout(state.roundTimer);
    state.roundTimer = setTimeout(async () => {
      if (generation !== state.generation || state.view !== "admin") return;
      try {
        const round = await api(`/rounds/${roundId}`);
        if (generation !== state.generation) return;
        showRound(round);
        if (ACTIVE_ROUND.has(round.status)) pollRound(roundId, generation);
        else await refreshAdmin();
      } catch (err) {
        showError(err);
      }
    }, ROUND_POLL_MS);
  }

  async function startRound() {
    const p = state.project;
    const button = $("round-start");
    if (button.disabled) return;
    button.disabled = true; // one click, one round (a second would get 409 anyway)
    let round;
    try {
      round = await api("/rounds", { method: "POST", json: { project_id: p.id } });
    } catch (err) {
      button.disabled = false;
      throw err;
    }
    clearError();
    announce(`Round ${round.number} ${round.status}.`);
    await refreshAdmin();
  }

  async function cancelRound() {
    const round = state.activeRound;
    if (!round) return;
    const updated = await api(`/rounds/${round.id}/cancel`, { method: "POST" });
    showRound(updated);
    if (!ACTIVE_ROUND.has(updated.status)) await refreshAdmin();
  }

  function fmt(value) {
    return typeof value === "number" ? value.toFixed(3) : "–";
  }

  function numericKeys(metrics) {
    if (!metrics) return [];
    return Object.keys(metrics).filter((k) => typeof metrics[k] === "number" && k !== "n");
  }

  function pickMetric(metrics) {
    const chosen = $("curve-metric").value;
    const keys = numericKeys(metrics);
    if (chosen && keys.includes(chosen)) return chosen;
    const preferred = PREFERRED_METRICS[state.project.task] || [];
    return preferred.find((k) => keys.includes(k)) || keys[0] || null;
  }

  function renderMetricChoices() {
    const select = $("curve-metric");
    const keys = new Set();
    for (const r of state.rounds) numericKeys(r.test_metrics).forEach((k) => keys.add(k));
    const previous = select.value;
    const preferred = PREFERRED_METRICS[state.project.task] || [];
    const ordered = [...preferred.filter((k) => keys.has(k)), ...[...keys].filter((k) => !preferred.includes(k)).sort()];
    select.replaceChildren(...ordered.map((k) => new Option(k.replaceAll("_", " "), k)));
    select.disabled = !ordered.length;
    if (ordered.includes(previous)) select.value = previous;
  }

  function curvePoints() {
    const metric = $("curve-metric").value;
    if (!metric) return [];
    return state.rounds
      .filter((r) => r.test_metrics && typeof r.test_metrics[metric] === "number" && r.labeled_count != null)
      .map((r) => ({ x: r.labeled_count, y: r.test_metrics[metric], round: r.number, stop: stopping(r) }));
  }

  // The stopping signal (issue 12): agreement of a round's pool predictions with the previous
  // round's (Cohen's kappa; "stabilizing predictions"). Near 1 for several rounds: more labels
  // stop changing the model's mind.
  function stopping(round) {
    const s = round.metrics && round.metrics.stopping;
    return s && typeof s.kappa === "number" ? s : null;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs, text) {
    const el = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text != null) el.textContent = text;
    return el;
  }

  function niceStep(span) {
    const raw = span / 5;
    const power = 10 ** Math.floor(Math.log10(raw || 1));
    const scaled = raw / power;
    return (scaled <= 1 ? 1 : scaled <= 2 ? 2 : scaled <= 5 ? 5 : 10) * power;
  }

  function renderCurve() {
    const points = curvePoints();
    const metric = $("curve-metric").value;
    const holder = $("curve");
    const table = $("curve-table");
    if (!points.length) {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = "No finished round with a test metric yet: the curve appears after the first round.";
      holder.replaceChildren(p);
      table.replaceChildren();
      return;
    }
    const W = 640, H = 280, left = 56, right = 20, top = 18, bottom = 46;
    const xMax = Math.max(...points.map((p) => p.x)) * 1.05 || 1;
    const yMaxData = Math.max(...points.map((p) => p.y));
    const yMax = yMaxData <= 1 ? 1 : yMaxData * 1.1;
    const sx = (x) => left + (x / xMax) * (W - left - right);
    const sy = (y) => top + (1 - y / yMax) * (H - top - bottom);
    const svg = svgEl("svg", {
      viewBox: `0 0 ${W} ${H}`,
      role: "img",
      "aria-labelledby": "curve-svg-title",
    });
    svg.append(svgEl("title", { id: "curve-svg-title" }, `Learning curve: test ${metric} against labeled images, ${points.length} rounds`));
    for (let i = 0; i <= 4; i += 1) {
      const y = (yMax * i) / 4;
      svg.append(svgEl("line", { class: "grid", x1: left, x2: W - right, y1: sy(y), y2: sy(y) }));
      svg.append(svgEl("text", { class: "tick", x: left - 8, y: sy(y) + 4, "text-anchor": "end" }, y.toFixed(2)));
    }
    const step = niceStep(xMax);
    for (let x = 0; x <= xMax; x += step) {
      svg.append(svgEl("line", { class: "axis", x1: sx(x), x2: sx(x), y1: H - bottom, y2: H - bottom + 5 }));
      svg.append(svgEl("text", { class: "tick", x: sx(x), y: H - bottom + 18, "text-anchor": "middle" }, String(Math.round(x))));
    }
    svg.append(svgEl("line", { class: "axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }));
    svg.append(svgEl("line", { class: "axis", x1: left, x2: left, y1: top, y2: H - bottom }));
    svg.append(svgEl("text", { class: "axis-label", x: (left + W - right) / 2, y: H - 8, "text-anchor": "middle" }, "labeled images"));
    svg.append(svgEl("text", { class: "axis-label", x: 14, y: (top + H - bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${(top + H - bottom) / 2})` }, `test ${metric.replaceAll("_", " ")}`));
    svg.append(svgEl("polyline", { class: "line", points: points.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") }));
    const stops = yMax === 1 ? points.filter((p) => p.stop) : [];
    if (stops.length) {
      const ky = (p) => sy(Math.max(0, p.stop.kappa));
      svg.append(svgEl("polyline", { class: "line stop-line", points: stops.map((p) => `${sx(p.x)},${ky(p)}`).join(" ") }));
      for (const p of stops) {
        const mark = svgEl("rect", { class: "stop-point", x: sx(p.x) - 4, y: ky(p) - 4, width: 8, height: 8 });
        mark.append(svgEl("title", {}, `Round ${p.round}: agreement with round ${p.stop.previous_round}, kappa ${fmt(p.stop.kappa)} (${p.stop.n} images)`));
        svg.append(mark);
      }
      svg.append(svgEl("text", { class: "tick stop-legend", x: W - right, y: top - 4, "text-anchor": "end" }, "dashed: kappa with the previous round (stopping signal)"));
    }
    for (const p of points) {
      const dot = svgEl("circle", { class: "point", cx: sx(p.x), cy: sy(p.y), r: 5 });
      dot.append(svgEl("title", {}, `Round ${p.round}: ${p.x} labels, ${metric} ${fmt(p.y)}`));
      svg.append(dot);
      svg.append(svgEl("text", { class: "point-label", x: sx(p.x), y: sy(p.y) - 10, "text-anchor": "middle" }, fmt(p.y)));
    }
    holder.replaceChildren(svg);
    fillTable(
      table,
      ["Round", "Labeled images", `Test ${metric.replaceAll("_", " ")}`, "Kappa with previous round"],
      points.map((p) => [p.round, p.x, fmt(p.y), p.stop ? `${fmt(p.stop.kappa)} (${p.stop.n} images)` : "–"]),
    );
  }

  function fillTable(table, headers, rows) {
    const thead = document.createElement("thead");
    const headRow = document.createElement("tr");
    for (const h of headers) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = h;
      headRow.append(th);
    }
    thead.append(headRow);
    const tbody = document.createElement("tbody");
    for (const row of rows) {
      const tr = document.createElement("tr");
      for (const cell of row) {
        const td = document.createElement("td");
        if (cell instanceof Node) td.append(cell);
        else td.textContent = String(cell);
        tr.append(td);
      }
      tbody.append(tr);
    }
    table.replaceChildren(thead, tbody);
  }

  function renderReaders(members, agreement) {
    agreement = agreement || {
      task: state.project.task, overlap: state.project.overlap, images_compared: 0, kappa: null,
      kappa_method: null, agreement: null, mean_dice: null, mean_iou: null,
      adjudication_rate: null, annotators: [],
    };
    const classes = agreement.task === "classification";
    const figures = [
      ["Readers per image", agreement.overlap],
      ["Images compared", agreement.images_compared],
      classes
        ? [`Kappa (${agreement.kappa_method || "–"})`, fmt(agreement.kappa)]
        : ["Mean Dice", fmt(agreement.mean_dice)],
      classes ? ["Raw agreement", fmt(agreement.agreement)] : ["Mean IoU", fmt(agreement.mean_iou)],
      ["Adjudication rate", fmt(agreement.adjudication_rate)],
    ];
    $("agreement").replaceChildren(...figures.map(([name, value]) => term("div", name, value)));
    const byUser = new Map(agreement.annotators.map((a) => [a.user_id, a]));
    const rows = members.map((m) => {
      const a = byUser.get(m.user_id) || {};
      const score = classes ? a.kappa : a.mean_dice;
      return [m.name, m.role, a.reads ?? 0, a.pairs ?? 0, fmt(score)];
    });
    const table = $("readers-table");
    if (!rows.length) {
      const caption = document.createElement("caption");
      caption.className = "muted";
      caption.textContent = "No members yet: annotators reach only the projects they are members of.";
      table.replaceChildren(caption);
      return;
    }
    fillTable(table, ["Member", "Role", "Reads compared", "Pairs", classes ? "Kappa" : "Mean Dice"], rows);
  }

  function renderModels() {
    const table = $("models-table");
    if (!state.models.length) {
      const caption = document.createElement("caption");
      caption.className = "muted";
      caption.textContent = "No trained model yet.";
      table.replaceChildren(caption);
      return;
    }
    const metric = pickMetric(state.models[0].test_metrics) || $("curve-metric").value;
    const rows = state.models.map((m) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "btn small";
      button.textContent = "Download";
      button.setAttribute("aria-label", `Download model version ${m.id}`);
      button.addEventListener("click", () => guarded(() => download(m)));
      const value = m.test_metrics && metric ? m.test_metrics[metric] : null;
      return [
        `v${m.id}`,
        `Round ${m.round_number}`,
        m.labeled_count ?? "–",
        fmt(value),
        new Date(m.created_at).toLocaleString(),
        m.sha256.slice(0, 12),
        button,
      ];
    });
    const metricName = metric ? `Test ${metric.replaceAll("_", " ")}` : "Test metric";
    fillTable(table, ["Version", "Round", "Labels", metricName, "Created", "SHA-256", "Checkpoint"], rows);
  }

  async function download(model) {
    const response = await api(model.download_url, { raw: true });
    const disposition = response.headers.get("content-disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = match ? match[1] : `model-${model.id}.pt`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ---------------------------------------------------------------------------------------
  // Wiring

  function wire() {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      clearError();
      guarded(() => signIn(token));
    });
    $("sign-out").addEventListener("click", () => signOut());
    $("error-close").addEventListener("click", clearError);
    $("project").addEventListener("change", (event) => guarded(() => selectProject(Number(event.target.value))));
    $("tab-annotate").addEventListener("click", () => selectView("annotate"));
    $("tab-admin").addEventListener("click", () => selectView("admin"));
    $("tab-review").addEventListener("click", () => selectView("review"));
    $("review-refresh").addEventListener("click", () => guarded(loadReview));
    $("review-send-back").addEventListener("click", () => guarded(() => settleReview({ send_back: true })));
    $("review-skip").addEventListener("click", () => guarded(skipReview));
    $("tab-annotate").addEventListener("keydown", onTabKey);
    $("tab-admin").addEventListener("keydown", onTabKey);
    $("tab-review").addEventListener("keydown", onTabKey);
    $("refresh-queue").addEventListener("click", () => guarded(loadNext));
    $("skip").addEventListener("click", () => skip());
    for (const ed of Object.values(editors)) wireEditor(ed);
    $("mask-reset").addEventListener("click", () => resetToPrediction(editors.annotate));
    $("mask-clear").addEventListener("click", () => clearMask(editors.annotate));
    $("mask-submit").addEventListener("click", () => guarded(submitMask));
    $("review-edit-settle").addEventListener("click", () => guarded(settleWithMask));
    $("review-edit-cancel").addEventListener("click", cancelReviewEdit);
    $("round-start").addEventListener("click", () => guarded(startRound));
    $("round-cancel").addEventListener("click", () => guarded(cancelRound));
    $("curve-metric").addEventListener("change", () => {
      renderCurve();
      renderModels();
    });
    document.addEventListener("keydown", onKey);
  }

  /** A mask editor's tools and canvas (see ``editors``). */
  function wireEditor(ed) {
    $(ed.brush).addEventListener("click", () => setTool(ed, "brush"));
    $(ed.eraser).addEventListener("click", () => setTool(ed, "eraser"));
    $(ed.size).addEventListener("input", (event) => setRadius(ed, Number(event.target.value)));
    $(ed.undo).addEventListener("click", () => undo(ed));
    const canvas = $(ed.canvas);
    canvas.addEventListener("pointerdown", (event) => onPointerDown(ed, event));
    canvas.addEventListener("pointermove", (event) => onPointerMove(ed, event));
    canvas.addEventListener("pointerup", () => onPointerUp(ed));
    canvas.addEventListener("pointercancel", () => onPointerUp(ed));
    canvas.addEventListener("pointerleave", () => ($(ed.cursor).hidden = true));
  }

  async function start() {
    wire();
    const token = localStorage.getItem(TOKEN_KEY);
    if (!token) {
      $("signin").hidden = false;
      return;
    }
    try {
      await signIn(token);
    } catch (err) {
      signOut();
      showError(err);
    }
  }

  start();
})();
