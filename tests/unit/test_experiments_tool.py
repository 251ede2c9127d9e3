"""tools/experiments.py's own bookkeeping (no testbed brought up)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from experiments import forget_profiles
from pace_drift import next_ratios


def test_fresh_profiles_drop_only_the_testbeds_run(tmp_path: Path) -> None:
    kept = {
        name: tmp_path / name / f"profiles-{host}-cpu1.0"
        for name, host in (("office", "desk"), ("campus", "kiosk"), ("lan-3", "laptop"))
    }
    for folder in kept.values():
        folder.mkdir(parents=True)
        (folder / "profile.json").write_text("{}")
    (tmp_path / "office" / "desk.log").write_text("a peer's log stays")
    gone = forget_profiles(tmp_path, ["office", "campus", "home-wifi"])  # one never run
    assert gone == [kept["office"], kept["campus"]]
    assert not kept["office"].exists() and not kept["campus"].exists()
    assert (kept["lan-3"] / "profile.json").exists()
    assert (tmp_path / "office" / "desk.log").exists()


def test_each_answer_is_set_against_the_prediction_read_after_the_one_before() -> None:
    # settled (no pace), then after answers 0, 1, 2
    predictions, measured = [90.0, 80.0, 100.0, 50.0], [70.0, 88.0, 75.0]
    assert next_ratios(predictions, measured) == [88.0 / 80.0, 75.0 / 100.0]
    assert next_ratios([90.0, 80.0], [70.0]) == []
