"""Fallback plans, pure: for each stage of a plan, the plan the mesh gives way to if that
stage's member is lost.

The coordinator computes them with each plan and publishes them in it. A spare preloads the
units a fallback would give it (a warm standby, chain/follower.py), and whoever coordinates
after the loss (the same coordinator, or the next by the election order when the lost member
was the coordinator) publishes the fallback as it stands, if it still fits, rather than a
fresh plan: so the units the standby holds are the units asked of it, and the switch loads
nothing there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import cast

from meshshard.mesh.coordinator import make_plan, mesh_instance, plan_record
from meshshard.mesh.election import elect
from meshshard.planner import InstanceError, Objective, Stage
from meshshard.planner.cost import evaluate
from meshshard.planner.instance import Instance
from meshshard.types import Fallback, Member, NodeId, PlanRecord, Profile, UnitCost


def with_fallbacks(
    plan: PlanRecord,
    members: Sequence[Member],
    profiles: Mapping[NodeId, Profile],
    units: Sequence[UnitCost],
    context_tokens: int,
) -> PlanRecord:
    """`plan` with a fallback for each stage's member. None for a member without which the
    rest cannot hold the model: that loss is reported at once instead (MeshTooSmall)."""
    objective = cast(Objective, plan.objective)
    coordinator = NodeId(plan.epoch.coordinator)
    fallbacks = []
    for stage in plan.stages:
        rest = [m for m in members if m.id != stage.device]
        source = coordinator if stage.device != coordinator else elect(rest)
        if source is None:
            continue
        try:
            inst = mesh_instance(rest, profiles, units, plan.model, source, context_tokens)
            alt = make_plan(inst, objective, source, plan.model, "")
        except InstanceError:
            continue
        fallbacks.append(Fallback(stage.device, alt.stages))
    return replace(plan, fallbacks=tuple(fallbacks))


def standing(current: PlanRecord, live: frozenset[NodeId], inst: Instance) -> PlanRecord | None:
    """The fallback to publish now, as a plan with a placeholder epoch: when exactly one of
    `current`'s stages is lost, it has a fallback, and that fallback still fits `inst` (the
    live members' numbers now, with this coordinator as its source). Else None: plan afresh."""
    lost = [s.device for s in current.stages if s.device not in live]
    fallback = current.fallback(lost[0]) if len(lost) == 1 else None
    if fallback is None:
        return None
    stages = [Stage(s.device, s.start, s.end) for s in fallback.stages]
    try:
        cost = evaluate(inst, stages)  # the source, the members and their memory now
    except InstanceError:
        return None
    objective = cast(Objective, current.objective)
    return plan_record(stages, cost, objective, NodeId(inst.source), current.model, "")


def outdated(current: PlanRecord, fresh: PlanRecord, live: frozenset[NodeId]) -> bool:
    """Whether a plan that stands should be published again with `fresh` fallbacks: when
    the members changed under them (a stage gained or lost its fallback, or one relies on a
    member gone), not when numbers moved (that would churn epochs for nothing)."""
    covered = {f.lost for f in current.fallbacks} != {f.lost for f in fresh.fallbacks}
    return covered or any(s.device not in live for f in current.fallbacks for s in f.stages)
