"""``coreloop simulate --via-api``: the oracle drives a real server and worker over HTTP.

The API (uvicorn) and a Celery worker run as processes on the embedded SQLite deployment; the
command creates a project, uploads a HAM10000-layout folder's pool and labeled test split, and
runs round 0 plus three trained rounds (10%, 15%, 20% labeled), writing the same results.csv
as a direct simulation. A rerun resumes: it reuses the project and stores nothing new.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from coreloop.cli import main as cli_main
from tests.ml.test_ham10000 import DX, write_ham_layout
from tests.worker.conftest import Processes, fresh_settings, make_admin

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOKEN = "via-api-admin-token"


def start_system(tmp_path: Path, processes: Processes) -> str:
    from app.db import make_engine, make_sessionmaker

    settings = fresh_settings("sqlite", tmp_path / "server", heartbeat_seconds=1.0)
    url = processes.start_api(settings)
    processes.start_worker(settings)
    engine = make_engine(settings)
    try:
        make_admin(make_sessionmaker(engine), TOKEN)
    finally:
        engine.dispose()
    return url


def simulate(url: str, data: Path, out: Path, task: str, token: str = TOKEN) -> int:
    return cli_main(["simulate", "--via-api", url, "--token", token, "--data", str(data),
                     "--out", str(out), "--task", task, "--strategies", "confident_coreset",
                     "--seeds", "0", "--image-size", "32", "--epochs", "1",
                     "--final-fraction", "0.2", "--no-progress"])  # fmt: skip


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_via_api_runs_the_protocol_through_the_server(
    task: str, tmp_path: Path, processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    url = start_system(tmp_path, processes)
    data = write_ham_layout(tmp_path / "ham", n=80)
    out = tmp_path / "out"

    assert simulate(url, data, out, task) == 0
    found = rows(out)
    assert [int(r["round"]) for r in found] == [0, 1, 2]
    assert {r["strategy"] for r in found} == {"confident_coreset"}
    n_pool = int(found[0]["n_pool"])
    assert 0 < int(found[0]["n_test"]) < n_pool
    labels = [int(r["labels"]) for r in found]
    assert labels[0] == math.ceil(0.1 * n_pool)  # the server's round 0 rounds up
    assert labels[1] - labels[0] == labels[2] - labels[1] == round(0.05 * n_pool)
    metric = "accuracy" if task == "classification" else "jaccard"
    assert all(0.0 <= float(r[metric]) <= 1.0 for r in found)  # measured by the worker
    if task == "classification":  # the worker's per-class recall, keyed by the classes
        recalls = [json.loads(r["class_recall"]) for r in found]
        assert all(sorted(r) == sorted(DX) for r in recalls)
    else:
        assert all(r["class_recall"] == "" for r in found)
    assert all(float(r["wall_seconds"]) > 0 and float(r["train_seconds"]) > 0 for r in found)
    journal = json.loads((out / "via-api.json").read_text())
    assert len(journal) == 3 and all(e["label_seconds"] >= 0 for e in journal.values())
    assert (out / "report.md").is_file()
    assert "oracle labeled" in capsys.readouterr().out

    # A rerun finds its project and its finished rounds: nothing is added.
    assert simulate(url, data, out, task) == 0
    assert rows(out) == found
    assert "reusing project" in capsys.readouterr().out


def test_via_api_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_ham_layout(tmp_path / "ham", n=20)
    out = tmp_path / "out"
    assert simulate("http://127.0.0.1:9", data, out, "classification", token="") == 2
    assert "a token is needed" in capsys.readouterr().out
    assert simulate("http://127.0.0.1:9", tmp_path / "nowhere", out, "classification") == 2
    assert "not found" in capsys.readouterr().out
    assert simulate("http://127.0.0.1:9", data, out, "classification") == 2  # nothing listens
    assert "is not ready" in capsys.readouterr().out
    assert not (out / "results.csv").exists()
