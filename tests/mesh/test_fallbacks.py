"""Fallback plans (pure): what each stage's loss gives way to, and when one is put in force."""

from __future__ import annotations

from dataclasses import replace

from meshshard.chain.following import standby
from meshshard.mesh.coordinator import make_plan, mesh_instance
from meshshard.mesh.election import elect
from meshshard.mesh.fallbacks import outdated, standing, with_fallbacks
from meshshard.types import Member, NodeId, PlanRecord, Profile, State, UnitCost

NAMES = [NodeId(n) for n in "abcd"]
UNITS = [UnitCost(f"U{i}", 100_000_000, 0, 4_000) for i in range(6)]
MB = 1e6


def mesh(names: list[NodeId], mem: float = 250 * MB) -> tuple[list[Member], dict[NodeId, Profile]]:
    """Members that hold two of the six units each: a chain takes three of them."""
    members = [Member(n, f"127.0.0.1:{7000 + i}", 1, State.ALIVE, i) for i, n in enumerate(names)]
    profiles = {n: Profile(n, 1, "m", mem, (1.0 + i / 10,) * 6, True) for i, n in enumerate(names)}
    return members, profiles


def plan_for(members: list[Member], profiles: dict[NodeId, Profile]) -> PlanRecord:
    coordinator = elect(members)
    assert coordinator is not None
    inst = mesh_instance(members, profiles, UNITS, "m", coordinator, 0)
    plan = make_plan(inst, "latency", coordinator, "m", "test")
    return with_fallbacks(plan, members, profiles, UNITS, 0)


def test_each_stage_has_a_fallback_without_its_member() -> None:
    members, profiles = mesh(NAMES)
    plan = plan_for(members, profiles)
    assert len(plan.stages) == 3
    assert [f.lost for f in plan.fallbacks] == [s.device for s in plan.stages]
    for fallback in plan.fallbacks:
        devices = [s.device for s in fallback.stages]
        assert fallback.lost not in devices
        assert fallback.stages[-1].end == len(UNITS)
        spare = next(n for n in NAMES if plan.stage_of(n) is None)
        assert spare in devices  # without a stage, the chain needs the spare


def test_the_coordinators_fallback_starts_at_the_next_coordinator() -> None:
    members, profiles = mesh(NAMES)
    plan = plan_for(members, profiles)
    coordinator = plan.epoch.coordinator
    fallback = plan.fallback(NodeId(coordinator))
    assert fallback is not None
    assert fallback.stages[0].device == elect([m for m in members if m.id != coordinator])


def test_no_fallback_where_the_rest_cannot_hold_the_model() -> None:
    members, profiles = mesh(NAMES[:3])
    assert plan_for(members, profiles).fallbacks == ()


def test_the_fallback_of_the_one_lost_stage_is_put_in_force_while_it_fits() -> None:
    members, profiles = mesh(NAMES)
    plan = plan_for(members, profiles)
    coordinator = NodeId(plan.epoch.coordinator)
    lost = plan.stages[-1].device
    rest = [m for m in members if m.id != lost]
    live = frozenset(m.id for m in rest)
    inst = mesh_instance(rest, profiles, UNITS, "m", coordinator, 0)
    chosen = standing(plan, live, inst)
    fallback = plan.fallback(lost)
    assert chosen is not None and fallback is not None
    assert chosen.stages == fallback.stages
    assert chosen.latency_ms > 0  # priced on today's numbers
    # Two stages lost: plan afresh.
    assert standing(plan, live - {plan.stages[1].device}, inst) is None
    # The spare's memory shrank meanwhile: the fallback no longer fits.
    spare = next(n for n in NAMES if plan.stage_of(n) is None)
    smaller = profiles | {spare: replace(profiles[spare], mem=50 * MB)}
    assert standing(plan, live, mesh_instance(rest, smaller, UNITS, "m", coordinator, 0)) is None
    # Nothing lost: no fallback.
    assert standing(plan, live | {lost}, inst) is None


def test_a_spare_preloads_the_units_its_fallbacks_give_it_most() -> None:
    members, profiles = mesh(NAMES)
    plan = plan_for(members, profiles)
    spare = next(n for n in NAMES if plan.stage_of(n) is None)
    given = [(s.start, s.end) for f in plan.fallbacks for s in f.stages if s.device == spare]
    assert standby(plan, spare) in given
    assert all(given.count(standby(plan, spare)) >= given.count(g) for g in given)
    assert standby(plan, plan.stages[0].device) is None  # a stage's memory is its own
    assert standby(replace(plan, fallbacks=()), spare) is None


def test_a_plan_that_stands_is_republished_only_when_members_change_its_fallbacks() -> None:
    members, profiles = mesh(NAMES)
    plan = plan_for(members, profiles)
    live = frozenset(NAMES)
    assert not outdated(plan, plan, live)
    # Numbers moved (a fallback chose other units): not worth a new epoch.
    moved = replace(plan.fallbacks[0], stages=plan.fallbacks[1].stages)
    assert not outdated(plan, replace(plan, fallbacks=(moved, *plan.fallbacks[1:])), live)
    # A spare joined where there was none: stages gain fallbacks.
    assert outdated(replace(plan, fallbacks=()), plan, live)
    # The spare the fallbacks rely on left.
    spare = next(n for n in NAMES if plan.stage_of(n) is None)
    assert outdated(plan, plan, live - {spare})
