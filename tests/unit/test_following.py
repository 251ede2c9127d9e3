"""How a stage follows plans, pure: what to load, when to switch, what a step's epoch means."""

from __future__ import annotations

import pytest

from meshshard.chain.following import (
    Load,
    NoUnits,
    Preparation,
    Reuse,
    Step,
    WaitNext,
    prepare,
    step_verdict,
    switch_now,
)
from meshshard.types import Epoch, NodeId, PlanRecord, PlanStage

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
PLAN = PlanRecord(
    Epoch(5, "c"), "m", "latency",
    (PlanStage(C, 0, 3), PlanStage(A, 3, 6), PlanStage(B, 6, 8)), 1.0, 1.0,
)  # fmt: skip


@pytest.mark.parametrize(
    "me, held, next_live, want",
    [
        (NodeId("d"), [], True, NoUnits()),
        (A, [], True, Load(3, 6)),
        (A, [(0, 3), (3, 6)], True, Reuse(3, 6)),  # kept across the plan change, caches too
        (A, [(3, 5)], True, Load(3, 6)),  # another range: a new shard
        (A, [], False, WaitNext(B)),  # where would its output go?
        (B, [], False, Load(6, 8)),  # the last stage sends only to the origin
    ],
)
def test_what_a_plan_asks_of_a_peer(
    me: NodeId, held: list[tuple[int, int]], next_live: bool, want: Preparation
) -> None:
    assert prepare(PLAN, me, held, next_live) == want


@pytest.mark.parametrize(
    "ready, serving, now", [(True, True, True), (False, True, False), (False, False, True)]
)
def test_when_a_prepared_plan_takes_over(ready: bool, serving: bool, now: bool) -> None:
    assert switch_now(ready, serving) is now


E4, E5, E6 = Epoch(4, "c"), Epoch(5, "c"), Epoch(6, "c")


@pytest.mark.parametrize(
    "epoch, serving, prepared, following, want",
    [
        (E5, E4, E5, E5, Step.SWITCH_AND_SERVE),  # the origin saw the new chain ready first
        (E4, E4, E5, E5, Step.SERVE),  # make-before-break: the old stage still serves
        (E5, E5, None, E5, Step.SERVE),
        (E4, E5, None, E5, Step.STALE),
        (E6, E5, None, E5, Step.NOT_READY),  # a plan this peer has not loaded yet
        (E5, None, None, None, Step.NOT_READY),  # no plan yet at all
        (E5, None, None, E6, Step.STALE),
    ],
)
def test_what_a_steps_epoch_means(
    epoch: Epoch, serving: Epoch | None, prepared: Epoch | None, following: Epoch | None, want: Step
) -> None:
    assert step_verdict(epoch, serving, prepared, following) == want
