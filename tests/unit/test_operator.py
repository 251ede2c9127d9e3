"""The operator's pieces without I/O: event log, token meter, log lines, plan requests, the
wire form of what dashboards read, and the terminal status table."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace

import cbor2
import pytest

from meshshard.api.operator import _plan_request
from meshshard.chain.meter import StepCostMeter, TokenMeter, pace
from meshshard.events import KEPT, EventLog
from meshshard.logs import JsonFormatter
from meshshard.publish import estimates, paces
from meshshard.status import render_status
from meshshard.types import Epoch, Member, NodeId, PlanRecord, PlanStage, Profile, State
from meshshard.wire import Sync, WireError, decode, encode
from meshshard.wire.checks import MIN_PACE


def test_event_log_numbers_stamps_and_tells_listeners() -> None:
    log = EventLog("peer-a", wall=lambda: 100.0)
    heard = []
    log.listen(heard.append)
    log.add("member", "peer-b unknown -> alive", "alive")
    log.epoch = (3, "peer-a")
    e = log.add("plan", "plan epoch 3/peer-a")
    assert [x.seq for x in heard] == [1, 2] and e.epoch == (3, "peer-a")
    assert heard[0].epoch is None and heard[0].tag == "alive"
    assert [x.text for x in log.since(1)] == ["plan epoch 3/peer-a"]
    for i in range(KEPT + 5):
        log.add("peer", f"event {i}")
    assert len(log.since(0)) == KEPT and log.last_seq == KEPT + 7


async def test_event_log_wakes_a_waiting_feed() -> None:
    import asyncio

    log = EventLog("peer-a")
    waiter = asyncio.create_task(log.wait(log.last_seq, timeout=5))
    await asyncio.sleep(0.01)
    log.add("peer", "something")
    await asyncio.wait_for(waiter, 1)
    await log.wait(0, timeout=5)  # already newer: returns at once


def test_token_meter_measures_gaps_within_sessions() -> None:
    now = [0.0]
    meter = TokenMeter(clock=lambda: now[0])
    for t in (0.0, 0.05, 0.10, 0.15):
        now[0] = t
        meter.token("s1")
    assert meter.latency_ms == pytest.approx(50.0)
    now[0] = 5.0
    meter.token("s2")  # a new session's first token is not a gap
    assert meter.latency_ms == pytest.approx(50.0)
    assert meter.tokens_per_s() == pytest.approx(5 / 5.0)
    now[0] = 30.0
    assert meter.tokens_per_s() == 0.0


def test_step_cost_meter_counts_cpu_beyond_forward_passes_at_the_peers_speed() -> None:
    meter, stage = StepCostMeter(), object()
    meter.observe(stage, 0.0, 9.5, 4.0, 16.0, 100, 100)  # the first look is a baseline
    meter.observe(stage, 1.0, 9.9, 4.0, 16.0, 100, 100)  # idle, but a link probe's transfer ran
    meter.observe(stage, 2.0, 10.0, 4.0, 16.0, 100, 100)  # idle: gossip, 0.1 s of CPU a second
    meter.observe(stage, 3.0, 10.1, 4.0, 16.0, 100, 100)  # ... and 0.1
    assert meter.background == pytest.approx(0.1) and meter.parts() == (0.0, 0.0)
    meter.observe(stage, 4.0, 10.5, 4.2, 16.8, 110, 110)  # too few steps to say
    assert meter.parts() == (0.0, 0.0)
    # 40 steps in 2 s: 1.4 s of CPU, 1.0 s of it in forward passes that took 4 s of wall time
    # (a quarter core) and 0.2 s the background's: 5 ms of CPU a step, 20 ms at that speed.
    # Lone steps only: all of it counts per step.
    meter.observe(stage, 5.0, 11.5, 5.0, 20.0, 140, 140)
    assert meter.parts() == pytest.approx((0.0, 20.0))
    meter.observe(object(), 6.0, 50.0, 0.0, 0.0, 0, 0)  # a new stage: a new baseline
    assert meter.parts() == pytest.approx((0.0, 20.0))


def metered(*windows: tuple[int, int, float]) -> StepCostMeter:
    """A meter that looked at a stage after each window of 2 s: its steps, its passes and
    the CPU seconds beyond them (1 s of passes each, at full speed; no background)."""
    meter, stage = StepCostMeter(), object()
    meter.observe(stage, 0.0, 0.0, 0.0, 0.0, 0, 0)
    now = process = forward = 0.0
    steps = passes = 0
    for n, p, beyond in windows:
        now, forward, steps, passes = now + 2, forward + 1.0, steps + n, passes + p
        process += 1.0 + beyond
        meter.observe(stage, now, process, forward, forward, steps, passes)
    return meter


def test_step_cost_meter_tells_a_pass_s_part_from_a_step_s() -> None:
    """Lone passes at 20 ms a step, then bursts of 4 rows a pass at 8 ms a step: 16 ms a
    pass and 4 a step fit both (16 + 4, 16 / 4 + 4)."""
    meter = metered((40, 40, 0.8), (80, 20, 0.64))
    assert meter.parts() == pytest.approx((16.0, 4.0))
    # Before any burst all of it is a step's; bursts alone say nothing of a lone pass.
    assert metered((40, 40, 0.8)).parts() == pytest.approx((0.0, 20.0))
    assert metered((80, 20, 0.64)).parts() == pytest.approx((0.0, 8.0))
    # Bursts dearer a step than lone passes: their rows are what costs, at the bursts' price.
    assert metered((40, 40, 0.8), (80, 20, 2.0)).parts() == pytest.approx((0.0, 25.0))
    # Bursts nearly free: a pass's part is at most a lone step's whole cost.
    assert metered((40, 40, 0.8), (80, 20, 0.0)).parts() == pytest.approx((20.0, 0.0))


def test_pace_is_the_passes_as_measured_over_the_profile_weighted_by_how_often_they_ran() -> None:
    profiled = {1: 10.0, 2: 12.0, 4: 20.0}.__getitem__
    assert pace(({}, {}, profiled), several=False) is None
    # One row's passes and several rows' apart: 90 of one row at 12 ms where 10 were said;
    # 10 of two rows at 15 and 10 of four at 30, 450 ms where 320 were said.
    ran = ({1: 12.0, 2: 15.0, 4: 30.0}, {1: 90, 2: 10, 4: 10}, profiled)
    assert pace(ran, several=False) == pytest.approx(12.0 / 10.0)
    assert pace(ran, several=True) == pytest.approx(450 / 320)
    assert pace(({1: 12.0}, {1: 90}, profiled), several=True) is None  # none of several ran
    # Passes of another kind, priced their own way, weigh in by how often they ran.
    other = {1: 5.0}.__getitem__
    got = pace(({1: 12.0}, {1: 90}, profiled), ({1: 6.0}, {1: 30}, other), several=False)
    assert got == pytest.approx((1080 + 180) / (900 + 150))
    # Passes priced under a millisecond (a stage that only embeds) measure their fixed
    # costs, not the device: no pace from them, alone or on average with others.
    tiny = {1: 0.08}.__getitem__
    assert pace(({1: 0.6}, {1: 90}, tiny), several=False) is None
    small = ({1: 1.2}, {1: 10}, {1: 1.1}.__getitem__)
    assert pace(({1: 0.6}, {1: 90}, tiny), small, several=False) is None
    assert pace(({1: 0.6}, {1: 10}, tiny), ({1: 12.0}, {1: 90}, profiled), several=False) == (
        pytest.approx((6 + 1080) / (0.8 + 900))
    )


def _stage(**kw: object) -> SimpleNamespace:
    counts = {"paced_ms": {}, "passes": Counter(), "paced_split_ms": {}, "split_passes": Counter()}
    return SimpleNamespace(
        shard=SimpleNamespace(start=1, end=4), costs=SimpleNamespace(**(counts | kw))
    )


def test_a_peer_publishes_its_stages_paces_against_its_own_units() -> None:
    me = Profile(NodeId("a"), 1, "m", 1e9, (1.0, 2.0, 4.0, 8.0), True)
    stage = _stage(paced_ms={1: 21.0}, passes=Counter({1: 5}))
    assert paces(me, stage) == (pytest.approx(21.0 / 14.0), None)  # type: ignore[arg-type]
    assert paces(me, _stage()) == paces(me, None) == (None, None)  # type: ignore[arg-type]
    fast = _stage(paced_ms={1: 1e-6}, passes=Counter({1: 5}))
    assert paces(me, fast)[0] == MIN_PACE  # type: ignore[arg-type]  # what the wire takes
    # Without batched timings a profile prices 2 rows at twice one: 28 ms said for 35.
    both = _stage(paced_ms={1: 21.0, 2: 35.0}, passes=Counter({1: 5, 2: 3}))
    assert paces(me, both) == (pytest.approx(1.5), pytest.approx(35.0 / 28.0))  # type: ignore[arg-type]


def test_a_split_heads_passes_are_priced_without_the_head() -> None:
    # Units 1-3 of a profile whose last unit, the head, costs 8 ms: a lone answer's pass
    # stops before it (its share is scored apart), so the profile says 2 + 4 = 6 ms.
    me = Profile(NodeId("a"), 1, "m", 1e9, (1.0, 2.0, 4.0, 8.0), True)
    lone = _stage(paced_split_ms={1: 9.0}, split_passes=Counter({1: 40}))
    assert paces(me, lone)[0] == pytest.approx(9.0 / 6.0)  # type: ignore[arg-type]
    # Beside whole passes (14 ms said) each kind counts as often as it ran.
    both = _stage(
        paced_ms={1: 21.0},
        passes=Counter({1: 10}),
        paced_split_ms={1: 9.0},
        split_passes=Counter({1: 40}),
    )
    assert paces(me, both)[0] == pytest.approx((210 + 360) / (140 + 240))  # type: ignore[arg-type]


def test_json_log_lines_carry_node_and_epoch() -> None:
    record = logging.LogRecord("meshshard.events", logging.INFO, "", 0, "[%s] %s", ("a", "b"), None)
    record.node, record.epoch, record.kind = "peer-a", "3/peer-a", "plan"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "[a] b" and line["node"] == "peer-a" and line["epoch"] == "3/peer-a"
    assert line["level"] == "info" and line["kind"] == "plan"


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "JSON object"),
        ({"use": "magic"}, "use must be"),
        ({"objective": "speed"}, "objective must be"),
        ({"exclude": "peer-b"}, "exclude must be"),
        ({"exclude": [1]}, "exclude must be"),
    ],
)
def test_bad_plan_requests_say_why(body: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _plan_request(body)


def test_plan_request_defaults() -> None:
    assert _plan_request({}) == ("planner", None, ())
    assert _plan_request({"use": "even", "objective": "throughput", "exclude": ["b"]}) == (
        "even",
        "throughput",
        ("b",),
    )


def _sync(plan: PlanRecord, profile: Profile) -> Sync:
    me = Member(NodeId("a"), "10.0.0.1:7000", 1, State.ALIVE)
    return Sync(me, (me,), (profile,), plan)


PLAN = PlanRecord(
    Epoch(2, "a"),
    "m",
    "latency",
    (PlanStage(NodeId("a"), 0, 4),),
    10.0,
    10.0,
    "b gone",
    left_out=((NodeId("c"), "its 10 Mbit/s link costs more than its compute saves"),),
)
PROFILE = Profile(
    NodeId("a"), 3, "m", 1e9, (1.0,) * 4, True, load=2.0, step_ms=12.5, used=3e8, frame=10**6
)


def test_left_out_reasons_and_load_cross_the_wire() -> None:
    back = decode(encode(_sync(PLAN, PROFILE)))
    assert isinstance(back, Sync)
    assert back.plan == PLAN and back.profiles == (PROFILE,)


def test_a_profile_saying_no_frame_limit_or_an_impossible_one() -> None:
    """A profile of an older peer says no limit (0: unknown); a negative one is refused."""
    raw = cbor2.loads(encode(_sync(PLAN, PROFILE)))
    del raw["profiles"][0]["frame"]
    back = decode(cbor2.dumps(raw))
    assert isinstance(back, Sync) and back.profiles[0].frame == 0
    raw["profiles"][0]["frame"] = -1
    with pytest.raises(WireError, match="frame"):
        decode(cbor2.dumps(raw))


def test_a_malformed_left_out_is_refused() -> None:
    raw = cbor2.loads(encode(_sync(PLAN, PROFILE)))
    raw["plan"]["left_out"] = [["c"]]
    with pytest.raises(WireError, match="left_out"):
        decode(cbor2.dumps(raw))


def test_status_table_shows_stages_reasons_and_events() -> None:
    status = {
        "id": "a",
        "model": "m",
        "coordinator": "a",
        "epoch": [2, "a"],
        "members": [
            {
                "id": "a",
                "state": "alive",
                "addr": "10.0.0.1:7000",
                "mem": 4e8,
                "shard": [0, 4],
                "measured": True,
                "incarnation": 1,
                "step_ms": 12.5,
                "used": 3e8,
                "sessions": 2.0,
                "pace": 1.27,
                "batch_pace": 0.94,
            },
            {
                "id": "c",
                "state": "alive",
                "addr": "10.0.0.3:7000",
                "mem": 4e8,
                "shard": None,
                "measured": True,
                "incarnation": 1,
                "draining": True,
            },
        ],
        "plan": {
            **PLAN.__dict__,
            "stages": [{"device": "a", "start": 0, "end": 4}],
            "tokens_per_s": 100.0,
            "left_out": dict(PLAN.left_out),
        },
        "idle": dict(PLAN.left_out),
        "measured": {"latency_ms": 11.0, "tokens_per_s": 80.0},
        "links": [{"a": "a", "b": "c", "mbps": 10.0, "rtt_ms": 2.0}],
        "events": [{"t": 0.0, "kind": "member", "text": "b alive -> dead"}],
    }
    text = render_status(status)
    needles = ["12.5 ms", "300 MB", "draining", "left out c: its 10 Mbit/s link", "[b gone]",
               "measured here 11.0 ms/token", "10 Mbit/s", "b alive -> dead",
               "measured, x1.27, x0.94 batched now"]  # fmt: skip
    for needle in needles:
        assert needle in text, needle
    assert text.count(" now") == 1  # a member without a pace shows none


def test_several_rows_go_at_one_rows_pace_until_a_burst_has_run() -> None:
    me = replace(Profile(NodeId("a"), 1, "m", 1e9, (1.0, 2.0), True), pace=0.8, batch_pace=0.9)
    # Before any burst: the host's drift since the profile, as one row's passes show it.
    assert estimates(me, 0.7, None, bursts=False) == (0.7, 0.7)
    assert estimates(me, None, None, bursts=False) == (0.8, 0.8)
    # Measured, each kind its own; after a burst, the last one measured stays.
    assert estimates(me, 0.7, 0.95, bursts=True) == (0.7, 0.95)
    assert estimates(me, 0.7, None, bursts=True) == (0.7, 0.9)
