"""The simulation protocol end to end on a tiny HAM10000-layout folder: rows, paired initial
sets, the report, crash and resume without duplicates, the CLI's presets and errors."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from ml import simulate
from ml.ham10000 import read_ham10000
from ml.simulate import SimulationConfig, parse_args, run_simulation, schedule
from tests.ml.test_ham10000 import DX, write_ham_layout

# 60 images -> pool ~48; 20% initial + one 20% round -> two rounds (labels ~10, ~20).
FAST = ["--image-size", "32", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
        "--initial-fraction", "0.2", "--budget-fraction", "0.2", "--final-fraction", "0.4",
        "--no-progress"]  # fmt: skip
STRATEGIES = ("random", "confident_coreset")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def keys(rows: list[dict[str, str]]) -> list[tuple[str, str, str]]:
    return [(r["strategy"], r["seed"], r["round"]) for r in rows]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ham_layout(tmp_path_factory.mktemp("ham"))


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def crashed(layout: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A classification run killed after round 0 of its second strategy (a hook raises), with a
    half-written CSV line; returns its out folder and the rows it had stored."""
    out = tmp_path_factory.mktemp("run")
    config = SimulationConfig(data=layout, out=out, strategies=STRATEGIES, seeds=(0,),
                              image_size=32, epochs=1, batch_size=32, device="cpu",
                              initial_fraction=0.2, budget_fraction=0.2, final_fraction=0.4,
                              progress=False)  # fmt: skip

    def crash_mid_strategy(row: dict[str, Any]) -> None:
        if (row["strategy"], row["round"]) == ("confident_coreset", 0):
            raise Crash

    with pytest.raises(Crash):
        run_simulation(config, after_round=crash_mid_strategy)
    stored = [f"{s}/{r}" for s, _, r in keys(read_csv(out / "results.csv"))]
    with (out / "results.csv").open("a") as handle:  # a write cut by the kill
        handle.write("classification,confident_coreset,0,1,2")
    return out, stored


@pytest.fixture(scope="module")
def finished(layout: Path, crashed: tuple[Path, list[str]]) -> Path:
    """The crashed run, resumed through the CLI with the same settings."""
    out = crashed[0]
    argv = ["--data", str(layout), "--out", str(out), "--strategies", ",".join(STRATEGIES),
            "--seeds", "0", *FAST]  # fmt: skip
    assert simulate.main(argv) == 0
    return out


def test_schedule() -> None:
    assert schedule(8012, 0.10, 0.05, 0.40) == [801, 1202, 1603, 2004, 2405, 2806, 3207]
    assert schedule(48, 0.2, 0.2, 0.4) == [10, 20]
    assert schedule(100, 0.1, 0.05, 0.1) == [10]


def test_crash_then_resume_has_no_duplicates(
    crashed: tuple[Path, list[str]], finished: Path
) -> None:
    assert crashed[1] == ["full/0", "random/0", "random/1", "confident_coreset/0"]
    rows = read_csv(finished / "results.csv")
    assert max(Counter(keys(rows)).values()) == 1
    expected = [("full", "0"), ("random", "0"), ("random", "1"),
                ("confident_coreset", "0"), ("confident_coreset", "1")]  # fmt: skip
    assert keys(rows) == [(s, "0", r) for s, r in expected]


def test_run_writes_rows_report_and_paired_initial_sets(finished: Path) -> None:
    rows = read_csv(finished / "results.csv")
    n_pool = int(rows[0]["n_pool"])
    assert int(rows[0]["labels"]) == n_pool and float(rows[0]["fraction"]) == 1.0
    assert [int(r["labels"]) for r in rows[1:]] == schedule(n_pool, 0.2, 0.2, 0.4) * 2
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0
        assert 0.0 <= float(row["balanced_accuracy"]) <= 1.0
        assert row["jaccard"] == "" and float(row["alpha"]) == 0.25
        assert float(row["wall_seconds"]) >= float(row["train_seconds"]) > 0
    assert float(rows[3]["select_seconds"]) > 0 and float(rows[4]["select_seconds"]) == 0
    folder = finished / "selections"
    picks = {s: json.loads((folder / f"classification-{s}-seed0.json").read_text())
             for s in STRATEGIES}  # fmt: skip
    assert picks["random"]["0"] == picks["confident_coreset"]["0"]  # the paired design
    for p in picks.values():
        assert not set(p["1"]) & set(p["0"]) and len(set(p["1"])) == len(p["1"])
    # round 0 trains the same images with the same seed: identical test metrics
    assert rows[1]["accuracy"] == rows[3]["accuracy"]
    for row in rows:  # per-class test recall, keyed by the metadata's classes
        recall = json.loads(row["class_recall"])
        assert sorted(recall) == sorted(DX)
        assert all(v is None or 0.0 <= v <= 1.0 for v in recall.values())
    assert "recall per class at the last round" in (finished / "report.md").read_text()
    assert (finished / "learning-curve-classification.png").stat().st_size > 5_000
    assert len(list((finished / "cache").glob("images-32px-*.npy"))) == 1


def test_resume_from_sidecar_repeats_the_round_exactly(finished: Path, tmp_path: Path) -> None:
    """Drop the last row (as if killed after its picks were stored): the rerun retrains that
    round on the sidecar's labeled set and gets the same metrics (CPU training is
    deterministic)."""
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    lines = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(lines[:-1]))
    data = json.loads((out / "run.json").read_text())["data"]
    argv = ["--data", data, "--out", str(out), "--strategies", ",".join(STRATEGIES),
            "--seeds", "0", *FAST]  # fmt: skip
    assert simulate.main(argv) == 0
    before, after = read_csv(finished / "results.csv"), read_csv(out / "results.csv")
    assert keys(after) == keys(before)
    assert after[-1]["accuracy"] == before[-1]["accuracy"]
    for strategy in STRATEGIES:
        name = f"selections/classification-{strategy}-seed0.json"
        assert (out / name).read_text() == (finished / name).read_text()


def test_resume_keeps_an_older_csv_header(finished: Path, tmp_path: Path) -> None:
    """A CSV written before ``class_recall`` existed: resumed rows follow its header, so every
    line keeps the same number of cells and ``coreloop report`` still reads it."""
    out = tmp_path / "old"
    shutil.copytree(finished, out)
    old_columns = [c for c in simulate.COLUMNS if c != "class_recall"]
    rows = read_csv(out / "results.csv")[:-1]  # the last round is rerun
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    data = json.loads((out / "run.json").read_text())["data"]
    argv = ["--data", data, "--out", str(out), "--strategies", ",".join(STRATEGIES),
            "--seeds", "0", *FAST]  # fmt: skip
    assert simulate.main(argv) == 0
    with (out / "results.csv").open(newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == old_columns and {len(line) for line in lines} == {len(old_columns)}
    assert keys(read_csv(out / "results.csv")) == keys(read_csv(finished / "results.csv"))
    assert "recall per class" not in (out / "report.md").read_text()


@pytest.mark.slow  # a U-Net: the slowest test here
def test_segmentation_run(layout: Path, tmp_path: Path) -> None:
    argv = ["--data", str(layout), "--masks", str(layout / "masks"), "--out", str(tmp_path),
            "--task", "segmentation", "--strategies", "confident_coreset", "--limit", "30",
            "--no-full", *FAST]  # fmt: skip
    assert simulate.main(argv) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [(r["strategy"], r["round"]) for r in rows] == [("confident_coreset", "0"),
                                                           ("confident_coreset", "1")]  # fmt: skip
    for row in rows:
        assert 0.0 <= float(row["jaccard"]) <= float(row["dice"]) <= 1.0
        assert row["accuracy"] == row["class_recall"] == "" and float(row["alpha"]) == 0.5
    assert (tmp_path / "learning-curve-segmentation.png").is_file()


def test_presets_are_defaults_that_flags_override() -> None:
    args = parse_args(["--preset", "cpu-cls", "--data", "x"])
    assert args.image_size == 64 and args.device == "cpu" and args.task == "classification"
    assert len(args.strategies.split(",")) >= 5 and args.seeds == "0,1,2"
    assert parse_args(["--preset", "cpu-cls", "--epochs", "7"]).epochs == 7
    seg = parse_args(["--preset", "cpu-seg"])
    assert seg.task == "segmentation" and seg.strategies == "random,confident_coreset"
    gpu = parse_args(["--preset", "gpu"])
    assert gpu.image_size == 224 and gpu.device == "cuda"
    # The measured presets keep the recipe they were measured with; no preset: the new one.
    assert (args.augment, args.class_balance, seg.seg_loss) == ("flip", "none", "dice")
    plain = parse_args(["--data", "x"])
    assert (plain.augment, plain.class_balance, plain.seg_loss) == ("derm", "sampler", "dice_bce")
    # The pre-registered runs (issue 13): seeds 10-15, 10% -> 30%, no full model, repeatable.
    for name, arms in (("prereg-cls", "random,confident_coreset,vaal"),
                       ("prereg-seg", "random,confident_coreset")):  # fmt: skip
        pre = parse_args(["--preset", name, "--data", "x"])
        assert pre.strategies == arms and pre.seeds == "10,11,12,13,14,15"
        assert pre.final_fraction == 0.30 and pre.no_full and pre.threads == 2
        assert (pre.augment, pre.class_balance, pre.warm_start_epochs) == ("derm", "sampler", 0)


def test_cli_errors(
    layout: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate.main(["--via-api", "http://localhost:8000", "--data", str(layout)]) == 2
    assert "coreloop simulate --via-api URL" in capsys.readouterr().err
    assert simulate.main(["--data", str(layout), "--strategies", "random,bogus", *FAST]) == 2
    assert "unknown strategies" in capsys.readouterr().err
    argv = ["--data", str(layout), "--out", str(finished), "--strategies", "random", *FAST]
    assert simulate.main([*argv, "--epochs", "2"]) == 2  # the out folder holds a 1-epoch run
    assert "other settings (epochs: 1 -> 2)" in capsys.readouterr().err
    assert simulate.main(["--task", "segmentation"]) == 2
    assert simulate.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "HAM10000_metadata.csv not found" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run.json").exists()  # a wrong --data does not pin the folder
    if not torch.cuda.is_available():
        cuda = ["--data", str(layout), "--out", str(finished), "--device", "cuda"]
        assert simulate.main(cuda) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_group_lesions_and_class_counts(layout: Path, tmp_path: Path) -> None:
    """--group-lesions batch: no round's picks hold two images of one lesion; every row records
    the class counts of its labeled set; the VAAL arm runs from the images."""
    out = tmp_path / "groups"
    args = ["--data", str(layout), "--out", str(out), "--strategies", "random,vaal",
            "--group-lesions", "batch", "--augment", "flip", *FAST]  # fmt: skip
    assert simulate.main(args) == 0
    index = read_ham10000(layout)
    for strategy in ("random", "vaal"):
        picks = json.loads(
            (out / "selections" / f"classification-{strategy}-seed0.json").read_text()
        )
        batch = picks["1"]
        assert len(batch) > 0
        lesions = [index.lesion_ids[r] for r in batch]
        assert len(set(lesions)) == len(lesions)
    rows = read_csv(out / "results.csv")
    for row in rows:
        counts = json.loads(row["class_counts"])
        assert set(counts) == set(DX) and sum(counts.values()) == int(row["labels"])
    saved = json.loads((out / "run.json").read_text())
    assert saved["group_lesions"] == "batch" and saved["augment"] == "flip"


def test_a_cold_start_arm_picks_its_own_initial_set(layout: Path, tmp_path: Path) -> None:
    """``confident_coreset@typiclust``: round 0's labeled set comes from TypiClust in the
    embedding (here of a seeded untrained ResNet-18), not the shared random set."""
    out = tmp_path / "cold"
    args = ["--data", str(layout), "--out", str(out), "--no-full", "--strategies",
            "random,confident_coreset@typiclust", *FAST]  # fmt: skip
    assert simulate.main(args) == 0
    selections = out / "selections"
    shared = json.loads((selections / "classification-random-seed0.json").read_text())["0"]
    cold_file = selections / "classification-confident_coreset@typiclust-seed0.json"
    cold = json.loads(cold_file.read_text())["0"]
    assert len(cold) == len(shared) and len(set(cold)) == len(cold) and cold != shared
    rows = read_csv(out / "results.csv")
    assert {r["strategy"] for r in rows} == {"random", "confident_coreset@typiclust"}
    bad = ["--data", str(layout), "--out", str(tmp_path / "bad"), "--strategies",
           "random@kmeans", *FAST]  # fmt: skip
    assert simulate.main(bad) == 2


def test_run_file_names_data_relative_and_accepts_older_absolute_paths(
    layout: Path, tmp_path: Path
) -> None:
    """run.json names the data folder relative to the working directory (a committed run file
    names no machine's path) and compares resolved paths, so an older absolute one still fits."""
    out = tmp_path / "rel"
    config = simulate.config_from_args(
        simulate.parse_args(["--data", str(layout), "--out", str(out), *FAST])
    )
    simulate.check_run_file(config, write=True)
    saved = json.loads((out / "run.json").read_text())
    assert not Path(saved["data"]).is_absolute()
    assert Path(saved["data"]).resolve() == layout.resolve()
    simulate.check_run_file(config)  # the same folder: accepted
    (out / "run.json").write_text(json.dumps({**saved, "data": str(layout.resolve())}))
    simulate.check_run_file(config)  # an older run file with the absolute path: accepted
    (out / "run.json").write_text(json.dumps({**saved, "data": str(tmp_path)}))
    with pytest.raises(ValueError, match="other settings"):
        simulate.check_run_file(config)


def test_committed_run_files_name_no_machine_path() -> None:
    root = Path(__file__).resolve().parents[2] / "docs" / "results"
    for path in root.rglob("*run*.json"):
        values = json.loads(path.read_text())
        assert not any(str(values.get(k) or "").startswith("/") for k in ("data", "masks")), path
