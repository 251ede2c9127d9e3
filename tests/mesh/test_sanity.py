"""What a peer believes of well-formed gossip from a key holder: pure, table-driven."""

from __future__ import annotations

import pytest

from meshshard.mesh.sanity import (
    FUTURE_SECONDS,
    incarnation_at,
    member_problem,
    plan_problem,
    profile_problem,
    term_at,
)
from meshshard.types import Epoch, Member, NodeId, PlanRecord, PlanStage, Profile, State

WALL = 1_800_000_000.0
UNITS = 4
MEMBERS = {
    NodeId(n): Member(NodeId(n), f"10.0.0.{i}:7117", 1, state)
    for i, (n, state) in enumerate(
        [("a", State.ALIVE), ("b", State.SUSPECT), ("dead", State.DEAD)], 1
    )
}


def plan(*stages: tuple[str, int, int], term: int = 5, model: str = "m") -> PlanRecord:
    return PlanRecord(
        Epoch(term, "a"),
        model,
        "latency",
        tuple(PlanStage(NodeId(d), s, e) for d, s, e in stages),
        1.0,
        1.0,
    )


@pytest.mark.parametrize(
    "record, problem",
    [
        (plan(("a", 0, 2), ("b", 2, 4)), None),  # a suspect still serves
        (plan(("a", 0, 4), term=term_at(WALL + FUTURE_SECONDS)), None),  # the largest accepted
        (plan(("a", 0, 4), term=term_at(WALL + FUTURE_SECONDS) + 1), "ahead of every clock"),
        (plan(("a", 0, 4), model="other"), "for model 'other'"),
        (plan(("a", 0, 3)), "covers units 0..2, not 0..3"),
        (plan(("a", 1, 4)), "covers units 1..3"),
        (plan(("a", 0, 2), ("a", 2, 4)), "two stages"),
        (plan(("a", 0, 2), ("ghost", 2, 4)), "ghost, not a live member"),
        (plan(("a", 0, 2), ("dead", 2, 4)), "dead, not a live member"),
        (plan(("b", 0, 4)), "needs 4e+08 bytes of b, which offers 3e+08"),
        (plan(("b", 0, 3), ("a", 3, 4)), None),  # 300 MB of b, and a's offer is unknown
    ],
)
def test_a_plan_is_followed_only_if_it_fits_this_model_mesh_and_memory(
    record: PlanRecord, problem: str | None
) -> None:
    offers = {NodeId("b"): 3e8}
    got = plan_problem(record, "m", [1e8] * UNITS, MEMBERS.get, offers.get, WALL)
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_incarnations_and_readiness_from_the_future_are_refused() -> None:
    a = MEMBERS[NodeId("a")]
    limit = incarnation_at(WALL + FUTURE_SECONDS)
    assert member_problem(Member(a.id, a.addr, limit, State.ALIVE), WALL) is None
    assert "incarnation" in str(member_problem(Member(a.id, a.addr, limit + 1, State.DEAD), WALL))
    late = Member(a.id, a.addr, 1, State.ALIVE, ready=Epoch(term_at(WALL) + 10**6, "a"))
    assert "ready for term" in str(member_problem(late, WALL))
    # What a refutation of the largest incarnation accepted needs is accepted a moment later.
    assert member_problem(Member(a.id, a.addr, limit + 1, State.ALIVE), WALL + 0.002) is None


def profile(node: str = "a", model: str = "m", ms: int = UNITS, batches: int = 1) -> Profile:
    return Profile(NodeId(node), 1, model, 1e9, (1.0,) * ms, True, ((2.0,) * ms,) * batches)


@pytest.mark.parametrize(
    "given, sender, problem",
    [
        (profile(), "a", None),
        (profile(model="other", ms=7), "a", None),  # another model: never planned with
        (profile(), "b", "b sent a profile of a"),
        (profile(ms=3), "a", "3 unit times for 4 units"),
        (profile(batches=9), "a", "batch times"),
    ],
)
def test_a_profile_comes_from_its_member_and_fits_the_model(
    given: Profile, sender: str, problem: str | None
) -> None:
    got = profile_problem(given, NodeId(sender), "m", UNITS)
    assert (got is None) if problem is None else (got is not None and problem in got)
