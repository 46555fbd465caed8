"""When the worker replaces its pool child (``worker.celery_app.pool_recycling``).

Forked children (Redis) live for one task. Spawned ones (the SQLite transport) are replaced only
once they hold a round's memory: the reaper, every 30 s, reuses one light child instead of a
new interpreter each time (about 1.3 s of CPU each).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from app.settings import Settings
from tests.worker.conftest import Processes, fresh_settings
from worker.celery_app import LIGHT_CHILD_MAX_KB, make_celery
from worker.embedded import worker_args


def test_spawned_children_are_recycled_by_memory_and_forked_ones_after_each_task(
    tmp_path: Path,
) -> None:
    embedded = make_celery(Settings(data_dir=tmp_path)).conf
    assert embedded.worker_pool_start_method == "spawn"
    assert embedded.worker_max_tasks_per_child is None
    assert embedded.worker_max_memory_per_child == LIGHT_CHILD_MAX_KB
    redis = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")).conf
    assert redis.worker_pool_start_method == "fork"
    assert redis.worker_max_tasks_per_child == 1
    assert redis.worker_max_memory_per_child is None
    # The command line leaves it to the configuration unless told otherwise.
    assert not any(a.startswith("--max-tasks-per-child") for a in worker_args())
    assert "--max-tasks-per-child=3" in worker_args(max_tasks_per_child=3)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_reaper_reuses_one_spawned_child(tmp_path: Path, processes: Processes) -> None:
    # A 4-s heartbeat timeout: the reaper runs every second (worker.celery_app.reap_interval).
    settings = fresh_settings("sqlite", tmp_path, heartbeat_timeout_seconds=4.0)
    processes.start_worker(settings)
    log = processes.logs[-1]
    deadline = time.monotonic() + 90
    reaps = 0
    while time.monotonic() < deadline and reaps < 5:
        time.sleep(0.5)
        reaps = log.read_text(errors="replace").count("round.reap[") // 2  # received, succeeded
    text = log.read_text(errors="replace")
    assert reaps >= 5, text[-3000:]
    children = set(re.findall(r"child process (\d+) calling self\.run\(\)", text))
    beat = set(re.findall(r"Beat\] child process (\d+) calling", text))
    assert len(children - beat) == 1, text[-3000:]  # one pool child for every reap
