"""Fault test: SIGKILL the whole worker process group while a round trains, start a new worker,
and check that the round finishes exactly once (one model version, one batch), resumed from the
dead run's last resumable checkpoint.

Embedded deployment (SQLite + kombu's SQLite transport, which never redelivers the message of
a dead worker): recovery rests on the heartbeat and the reaper alone (short timeout here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.models import ModelVersion, QueueItem
from tests.worker.conftest import Processes, wait_until
from tests.worker.test_e2e import (
    admin_client,
    count_rows,
    deployment_settings,
    upload_project,
)
from worker.embedded import kill_group

EPOCHS = 30  # long enough to kill mid-training even on an idle machine (15 images/epoch)


@pytest.mark.e2e
@pytest.mark.slow
def test_round_survives_a_killed_worker(tmp_path: Path, processes: Processes) -> None:
    settings = deployment_settings("sqlite", None, tmp_path, heartbeat_timeout_seconds=5.0)
    url = processes.start_api(settings)
    first_worker = processes.start_worker(settings, exclusive=False)
    api = admin_client(settings, url)
    project_id, truth = upload_project(api, epochs=EPOCHS)
    for image_id in list(truth)[:15]:
        api.label(image_id, truth[image_id])
    round_id = api.start_round(project_id)

    def training_past_epoch_one() -> dict[str, Any] | None:
        row = api.round(round_id)
        assert row["status"] in ("queued", "training"), row
        return row if row["progress"].get("epoch", 0) >= 1 else None

    wait_until(training_past_epoch_one, 300, "round 0 to finish an epoch", interval=0.05)
    kill_group(first_worker)
    first_worker.wait(timeout=30)
    killed = api.round(round_id)
    assert killed["status"] == "training" and killed["attempt"] == 1
    assert killed["progress"]["epoch"] < EPOCHS

    processes.start_worker(settings, exclusive=False)
    done = api.wait_round(round_id, timeout=600)
    assert done["attempt"] == 2
    assert len(done["metrics"]["history"]) == EPOCHS
    assert count_rows(settings, ModelVersion, round_id) == 1
    assert count_rows(settings, QueueItem, round_id) == 6
    second_log = processes.logs[-1].read_text(errors="replace")
    assert "heartbeat stopped on attempt 1; re-queued" in second_log
    assert "resuming models/" in second_log
