"""When a stage holds a decode batch for rows due soon: pure, on given times."""

from __future__ import annotations

import pytest

from meshshard.chain.waves import Arrivals, pays

PASS = 0.1  # seconds a decode pass takes


def decoding(rounds: dict[str, list[float]]) -> Arrivals:
    arrivals = Arrivals()
    for at, session in sorted((t, s) for s, times in rounds.items() for t in times):
        arrivals.arrived(session, at, decode=True)
    return arrivals


def test_holds_for_a_session_due_within_a_pass_until_the_pass_time_is_spent() -> None:
    # a every 0.3 s, b 0.05 s behind it: when a's step waits at 1.0, b is due at 1.05.
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75]})
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == pytest.approx(PASS)
    assert arrivals.hold({"a"}, {"a", "b"}, 1.06, 1.0, PASS) == pytest.approx(0.04)
    assert arrivals.hold({"a"}, {"a", "b"}, 1.1, 1.0, PASS) == 0  # held long enough


def test_no_hold_once_every_session_due_is_waiting() -> None:
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75, 1.03]})
    assert arrivals.hold({"a", "b"}, {"a", "b"}, 1.03, 1.0, PASS) == 0


def test_no_hold_for_a_session_due_later_than_a_pass_or_overdue_by_its_interval() -> None:
    later = decoding({"a": [0.4, 0.7, 1.0], "b": [0.55, 0.85]})  # due at 1.15
    assert later.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0
    gone = decoding({"a": [0.4, 0.7, 1.0], "b": [0.1, 0.3]})  # due at 0.5, every 0.2
    assert gone.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0
    late = decoding({"a": [0.4, 0.7, 1.0], "b": [0.35, 0.65]})  # due at 0.95: just behind
    assert late.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == pytest.approx(PASS)
    # Due at 0.8, later than a pass but within its own interval: its last round went through
    # a pass that slowed down (a prompt's slice in it), and it is on its way.
    slowed = decoding({"a": [0.4, 0.7, 1.0], "b": [0.2, 0.5]})
    assert slowed.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == pytest.approx(PASS)


def test_no_hold_for_sessions_gone_or_without_a_rhythm() -> None:
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75]})
    assert arrivals.hold({"a"}, {"a"}, 1.0, 1.0, PASS) == 0  # b was dropped here
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0  # and is forgotten
    fresh = decoding({"a": [0.4, 0.7, 1.0], "b": [0.75]})  # one decode step: no interval yet
    assert fresh.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0
    prompt = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75]})
    prompt.arrived("b", 0.8, decode=False)  # a feed after a replay: its rhythm starts over
    assert prompt.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0


def test_no_hold_before_a_pass_was_measured() -> None:
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75]})
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, 0.0) == 0


def test_a_hold_pays_only_where_rows_together_cost_less_than_apart() -> None:
    cpu = {1: 50.0, 2: 52.0, 3: 58.0}.get  # one pass reads the weights for every row
    proportional = {1: 50.0, 2: 100.0, 3: 150.0}.get
    assert pays(cpu, 1, 1) and pays(cpu, 2, 1)
    assert not pays(proportional, 1, 1) and not pays(proportional, 2, 1)
    assert pays({1: 50.0}.get, 1, 1)  # 2 rows not measured yet: taken to pay
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75]})  # b due within a pass
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS, cpu) == pytest.approx(PASS)
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS, proportional) == 0


def test_the_next_decode_step_due_counts_late_ones_not_gone_ones() -> None:
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.45, 0.75, 1.05]})  # due 1.3, 1.35
    assert arrivals.next_due(set(), {"a", "b"}, 1.1) == pytest.approx(1.3)
    assert arrivals.next_due({"a"}, {"a", "b"}, 1.1) == pytest.approx(1.35)  # a is here
    assert arrivals.next_due(set(), {"b"}, 1.1) == pytest.approx(1.35)  # a is gone
    assert arrivals.next_due(set(), {"a", "b"}, 1.5) == pytest.approx(1.3)  # late, not gone
    assert arrivals.next_due(set(), {"a", "b"}, 1.7) is None  # two intervals: gone


def test_holds_for_the_rest_of_a_wave_whatever_its_rhythm_said() -> None:
    """a and b went through the last pass together; b's rhythm, read from a slower round,
    says it is due well after a pass from now, but its frame travels with a's."""
    arrivals = decoding({"a": [0.4, 0.7, 1.0], "b": [0.6, 0.9]})  # b due at 1.2 by rhythm
    arrivals.ran({"a", "b"})
    assert arrivals.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == pytest.approx(PASS)
    assert arrivals.hold({"a"}, {"a"}, 1.0, 1.0, PASS) == 0  # b ended: no longer awaited
    # A wave member that fell behind is waited for once: the pass without it starts a wave
    # of its own.
    behind = decoding({"a": [0.4, 0.7, 1.0], "b": [0.6, 0.9]})
    behind.ran({"a", "b"})
    behind.ran({"a"})
    assert behind.hold({"a"}, {"a", "b"}, 1.0, 1.0, PASS) == 0


def test_a_step_is_due_its_time_away_after_its_pass_here_ended() -> None:
    """A pass that ran long here (a prompt's slice in it) delays the step's return by as
    much: read from the round before, the step would seem late, then gone."""
    arrivals = Arrivals()
    arrivals.arrived("a", 0.0, decode=True)
    arrivals.left(["a"], 0.05)
    arrivals.arrived("a", 0.3, decode=True)  # 0.25 s away
    arrivals.left(["a"], 0.45)  # a pass of 0.15 s
    assert arrivals.next_due(set(), {"a"}, 0.5) == pytest.approx(0.7)
    assert arrivals.next_due(set(), {"a"}, 0.95) == pytest.approx(0.7)  # late, not gone
    assert arrivals.next_due(set(), {"a"}, 1.05) is None  # its interval late: gone
