"""The pre-registered results in docs/benchmarks.md are the report's, recomputed from the
committed CSV (issue 13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.report import labels_to_reach_endpoint, primary_endpoint, read_rows

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "docs" / "benchmarks.md").read_text()
CLS = ROOT / "docs" / "results" / "prereg-cls.csv"


def _pp(value: float) -> str:
    return f"{100 * value:+.2f}".replace("-", "−")


def test_classification_endpoints_match_the_docs() -> None:
    rows = read_rows(CLS)
    primary = primary_endpoint(rows)
    assert primary.stat.n == 6 and sorted(primary.per_seed) == [10, 11, 12, 13, 14, 15]
    cells = " | ".join(_pp(primary.per_seed[s]) for s in range(10, 16))
    assert f"| difference (pp) | {cells} |" in DOCS
    s = primary.stat
    assert f"**{_pp(s.mean)[0] if s.mean < 0 else ''}{abs(100 * s.mean):.2f} " in DOCS
    assert f"[{_pp(s.low)}, {_pp(s.high)}]** | {s.p_t:.2f} | {s.p_perm:.3f} |" in DOCS
    accuracy = primary_endpoint(rows, metric="accuracy").stat
    assert f"**{_pp(accuracy.mean)} pp [{_pp(accuracy.low)}, {_pp(accuracy.high)}]**" in DOCS
    assert f"p (t) {accuracy.p_t:.2f}, sign-flip {accuracy.p_perm:.2f}" in DOCS
    vaal = primary_endpoint(rows, arm="vaal").stat
    assert f"VAAL minus random: {_pp(vaal.mean)} pp [{_pp(vaal.low)}, {_pp(vaal.high)}]" in DOCS
    reach = labels_to_reach_endpoint(rows)
    assert sorted(reach.per_seed) == [11, 12, 15]
    assert [round(100 * reach.per_seed[s]) for s in (11, 12, 15)] == [-10, -5, 0]


@pytest.mark.parametrize("arm", ["confident_coreset", "vaal"])
def test_no_verdict_of_significance(arm: str) -> None:
    stat = primary_endpoint(read_rows(CLS), arm=arm).stat
    assert stat.p_t > 0.05 and stat.p_perm > 0.05


SEG = ROOT / "docs" / "results" / "prereg-seg.csv"


def test_segmentation_endpoint_matches_the_docs() -> None:
    rows = read_rows(SEG)
    assert len(rows) == 60
    jaccard = primary_endpoint(rows, metric="jaccard")
    assert jaccard.stat.n == 6 and sorted(jaccard.per_seed) == [10, 11, 12, 13, 14, 15]
    cells = " | ".join(_pp(jaccard.per_seed[s]) for s in range(10, 16))
    assert f"| Jaccard difference (pp) | {cells} |" in DOCS
    s = jaccard.stat
    assert (
        f"**{_pp(s.mean)} [{_pp(s.low)}, {_pp(s.high)}]** | {s.p_t:.2f} | {s.p_perm:.3f} |" in DOCS
    )
    assert s.p_t > 0.05 and s.p_perm > 0.05  # "no difference shown"
    dice = primary_endpoint(rows, metric="dice").stat
    assert f"Dice, the same way (exploratory): {_pp(dice.mean)} pp [{_pp(dice.low)}, " in DOCS
