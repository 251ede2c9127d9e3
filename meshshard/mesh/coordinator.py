"""The coordinator's decisions, pure: when to replan, and the planner instance from gossip."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from meshshard.planner import Cost, InstanceError, Objective, Stage, solve
from meshshard.planner.build import build_instance
from meshshard.planner.instance import Instance, Link
from meshshard.types import (
    Epoch,
    LinkStat,
    Member,
    NodeId,
    PlanRecord,
    PlanStage,
    Profile,
    UnitCost,
)

# Links not yet measured are assumed to be a modest LAN.
UNMEASURED = Link(mbps=100.0, ms=1.0)


@dataclass(frozen=True)
class Signature:
    """What a plan depends on, rounded so that noise does not trigger replanning."""

    members: tuple[NodeId, ...]
    details: tuple[tuple[object, ...], ...]


def signature(
    members: Sequence[Member], profiles: Mapping[NodeId, Profile], model: str
) -> Signature:
    live = sorted(m.id for m in members if m.serving and _usable(profiles.get(m.id), model))
    details = []
    for node in live:
        p = profiles[node]
        links = tuple(
            (peer, _bucket(_typical_hop_ms(s)))
            for peer, s in sorted(p.links.items())
            if peer in live
        )
        details.append((node, _bucket(p.mem), _bucket(sum(p.unit_ms)), p.measured, links))
    return Signature(tuple(live), tuple(details))


def describe_change(old: Signature | None, new: Signature) -> str:
    if old is None:
        return "first plan"
    joined = sorted(set(new.members) - set(old.members))
    gone = sorted(set(old.members) - set(new.members))
    parts = [f"{n} joined" for n in joined] + [f"{n} gone" for n in gone]
    return ", ".join(parts) if parts else "profiles or links changed"


class Replanner:
    """Debounces changes: replans once the inputs have been steady for `debounce` seconds."""

    def __init__(self, debounce: float) -> None:
        self._debounce = debounce
        self._seen: Signature | None = None
        self._seen_at = 0.0
        self.planned: Signature | None = None

    def due(self, sig: Signature, now: float, have_plan: bool, urgent: bool = False) -> bool:
        """`urgent`: the plan in force lost a member, so every moment without one is lost
        work (the membership layer has already debounced the death)."""
        if sig != self._seen:
            self._seen, self._seen_at = sig, now
        if have_plan and sig == self.planned:
            return False
        return urgent or now - self._seen_at >= self._debounce

    def done(self, sig: Signature) -> None:
        self.planned = sig

    def forget(self) -> None:
        """We stopped coordinating: the next term plans afresh."""
        self.planned = None


def mesh_instance(
    members: Sequence[Member],
    profiles: Mapping[NodeId, Profile],
    units: Sequence[UnitCost],
    model: str,
    source: NodeId,
    context_tokens: int,
) -> Instance:
    live = [m.id for m in members if m.serving and _usable(profiles.get(m.id), model, len(units))]
    if source not in live:
        raise InstanceError(f"the source {source} has no usable profile yet")
    # A member's estimate of its link to another is what it moved *from* that member: the
    # rate from b to a is a's estimate of b. Rates go per direction (uplinks and downlinks
    # differ); a round trip is one for both, its half each way.
    pairs, directed = [], []
    for i, a in enumerate(live):
        for b in live[i + 1 :]:
            a_of_b, b_of_a = profiles[a].links.get(b), profiles[b].links.get(a)
            stats = [s for s in (a_of_b, b_of_a) if s]
            if not stats:
                continue
            mbps = sum(s.mbps for s in stats) / len(stats)
            half = sum(s.rtt_ms for s in stats) / len(stats) / 2
            pairs.append((a, b, Link(mbps=max(mbps, 1e-3), ms=half)))
            if a_of_b is not None:
                directed.append((b, a, Link(mbps=max(a_of_b.mbps, 1e-3), ms=half)))
            if b_of_a is not None:
                directed.append((a, b, Link(mbps=max(b_of_a.mbps, 1e-3), ms=half)))
    return build_instance(
        units,
        [(n, profiles[n].mem, profiles[n].unit_ms, profiles[n].device) for n in live],
        source=source,
        context_tokens=context_tokens,
        default_link=UNMEASURED,
        pairs=pairs,
        directed=directed,
    )


def make_plan(
    inst: Instance, objective: Objective, coordinator: NodeId, model: str, reason: str
) -> PlanRecord:
    """The best plan for the instance, with a placeholder epoch the caller replaces."""
    plan = solve(inst, objective)
    record = plan_record(plan.stages, plan.cost, objective, coordinator, model, reason)
    why = tuple((NodeId(node), text) for node, text in sorted(plan.left_out.items()))
    return replace(record, left_out=why)


def plan_record(
    stages: Sequence[Stage],
    cost: Cost,
    objective: Objective,
    coordinator: NodeId,
    model: str,
    reason: str,
) -> PlanRecord:
    """A planner's stages as a plan to publish, with a placeholder epoch."""
    return PlanRecord(
        epoch=Epoch(0, coordinator),
        model=model,
        objective=objective,
        stages=tuple(PlanStage(NodeId(s.device), s.start, s.end) for s in stages),
        latency_ms=cost.latency_ms,
        bottleneck_ms=cost.bottleneck_ms,
        reason=reason,
    )


def _usable(profile: Profile | None, model: str, units: int | None = None) -> bool:
    return (
        profile is not None
        and profile.model == model
        and (units is None or len(profile.unit_ms) == units)
    )


def _typical_hop_ms(stat: LinkStat) -> float:
    """A hop of a small activation, floored so sub-millisecond noise is one bucket."""
    return 0.5 + stat.rtt_ms / 2 + 16384 * 8 / (stat.mbps * 1000)


def _bucket(x: float) -> int:
    """Log-scale bucket about 20% wide."""
    return round(math.log(max(x, 1e-9)) / math.log(1.2))
