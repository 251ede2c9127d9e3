"""tools/steal.py: the hypervisor's share of the CPU, read from a /proc/stat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import steal


def stat(path: Path, user: int, idle: int, stolen: int) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user
    path.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {stolen} 7 0\ncpu0 1 2 3\n")


def test_share_is_stolen_ticks_over_all_ticks_watched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "stat"
    monkeypatch.setattr(steal, "STAT", path)
    stat(path, user=100, idle=100, stolen=0)
    stolen = steal.Stolen()
    assert stolen.share is None and str(stolen) == "n/a"
    with stolen.watch():
        stat(path, user=150, idle=130, stolen=20)  # 100 ticks pass, 20 of them stolen
    assert stolen.share == pytest.approx(0.2)
    with stolen.watch():
        stat(path, user=250, idle=230, stolen=20)  # 200 more, none stolen
    assert stolen.share == pytest.approx(20 / 300)
    assert str(stolen) == "6.7%"


def test_no_stat_file_counts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(steal, "STAT", tmp_path / "absent")
    assert steal.ticks() is None
    stolen = steal.Stolen()
    with stolen.watch():
        pass
    assert stolen.share is None
