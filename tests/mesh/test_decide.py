"""The coordinator's decision, pure: whether to replan, and why, as a table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshshard.mesh.coordinator import Replanner, Signature
from meshshard.mesh.decide import Keep, Replan, View, decide, worth_publishing
from meshshard.types import Epoch, NodeId, PlanRecord, PlanStage

A, B, C = NodeId("a"), NodeId("b"), NodeId("c")
SIG = Signature((A, B, C), ())


def plan(*devices: NodeId, coordinator: NodeId = C) -> PlanRecord:
    stages = tuple(PlanStage(d, i, i + 1) for i, d in enumerate(devices))
    return PlanRecord(Epoch(1, coordinator), "m", "latency", stages, 1.0, 1.0)


BASE = View(C, C, False, frozenset({A, B, C}), SIG, None, plan(C, A), "")
STEADY = Keep("nothing changed, or not for long enough")
PINNED = Keep("an operator's plan stands until the members change")
D = NodeId("d")


def settled(replanner: Replanner) -> Replanner:
    """A replanner that planned on SIG and has seen it steady."""
    replanner.due(SIG, 0.0, have_plan=True)
    replanner.done(SIG)
    return replanner


@pytest.mark.parametrize(
    "view, now, want",
    [
        (replace(BASE, leaving=True), 9.0, Keep("leaving the mesh")),
        (replace(BASE, coordinator=B), 9.0, Keep("not the coordinator", unpin=True)),
        # An operator's plan stands while its members do; then it is planned afresh.
        (replace(BASE, pinned=(A, B, C)), 9.0, PINNED),
        # Ours and steady: nothing to do.
        (BASE, 9.0, STEADY),
        # The members changed: after the debounce, a plan saying so.
        (replace(BASE, signature=Signature((A, B), ())), 0.05, STEADY),
        (replace(BASE, signature=Signature((A, B, C, D), ())), 9.0, Replan("d joined", True)),
        # A stage of the plan in force is gone: at once, and the reason names it.
        (replace(BASE, live=frozenset({B, C}), signature=Signature((B, C), ()), unwell="a gone"),
         0.0, Replan("a gone", False)),
        # Another coordinator's plan: ours replaces it.
        (replace(BASE, current=plan(B, A, coordinator=B)), 9.0, Replan("new coordinator", False)),
    ],
)  # fmt: skip
def test_when_the_coordinator_replans(view: View, now: float, want: Keep | Replan) -> None:
    replanner = settled(Replanner(debounce=0.1))
    if view.signature != SIG:
        replanner.due(view.signature, 0.0, have_plan=True)  # the change was seen at 0
    assert decide(view, now, replanner) == want


def test_a_pinned_plan_is_unpinned_once_its_members_change() -> None:
    view = replace(BASE, pinned=(A, B), signature=SIG)
    decision = decide(view, 0.0, settled(Replanner(0.1)))
    assert isinstance(decision, Keep) and decision.unpin


@pytest.mark.parametrize(
    "ours, settled_, better, publish",
    [
        (True, True, False, False),  # ours, still serving, not better: no churn
        (True, True, True, True),
        (True, False, False, True),  # made on estimates, now measured: redo
        (False, True, False, True),  # not ours (or broken): always
    ],
)
def test_when_a_new_plan_is_published(
    ours: bool, settled_: bool, better: bool, publish: bool
) -> None:
    assert worth_publishing(Replan("x", ours), settled_, better) is publish
