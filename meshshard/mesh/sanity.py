"""What a peer believes of gossip beyond what the wire's ranges allow, pure.

Any key holder can send any well-formed message, so one message must not be able to stop the
mesh. Incarnations and terms are anchored to the wall clock (an incarnation is a member's start
time in milliseconds, a term counts seconds): one far in the future is refused, so a forged
maximum cannot leave a member unable to refute it, or a coordinator unable to outbid it; the
largest one accepted is soon overtaken by the clock. A plan must fit this model, this mesh
and its devices' memory before a peer follows it, and a profile comes only from the member
it describes. (A key holder can still put any plan that passes in force: it is one the
planner could have made, and the mesh answers correctly under it.)

Peers' clocks must agree within FUTURE_SECONDS; sealed messages already need 120 s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshshard.model.batching import BATCHES
from meshshard.planner.cost import fits
from meshshard.types import Member, NodeId, PlanRecord, Profile

TERM_ORIGIN = 1_735_689_600  # 2025-01-01 UTC: terms count seconds from here
FUTURE_SECONDS = 3600.0  # how far ahead of our clock an incarnation or a term may be


def term_at(wall: float) -> int:
    """The term a coordinator starting a plan at `wall` (seconds since 1970) takes at least."""
    return int(wall) - TERM_ORIGIN


def incarnation_at(wall: float) -> int:
    """A member's first incarnation when it starts at `wall`: later than any before it."""
    return int(wall * 1000)


def future_incarnation(incarnation: int, wall: float) -> bool:
    return incarnation > incarnation_at(wall + FUTURE_SECONDS)


def future_term(term: int, wall: float) -> bool:
    return term > term_at(wall + FUTURE_SECONDS)


def member_problem(member: Member, wall: float) -> str | None:
    """Why a gossiped member record is refused, or None."""
    if future_incarnation(member.incarnation, wall):
        return f"{member.id}: incarnation {member.incarnation} is ahead of every clock"
    if future_term(member.ready.term, wall):
        return f"{member.id}: ready for term {member.ready.term}, ahead of every clock"
    return None


def plan_problem(
    plan: PlanRecord,
    model: str,
    unit_mem: Sequence[float],
    member: Callable[[NodeId], Member | None],
    offered: Callable[[NodeId], float | None],
    wall: float,
) -> str | None:
    """Why a plan is refused (its epoch, model, units, devices, or a stage more than its
    device offers, where we know the offer), or None to follow it."""
    units = len(unit_mem)
    if future_term(plan.epoch.term, wall):
        return f"plan epoch {plan.epoch} is ahead of every clock"
    if plan.model != model:
        return f"plan epoch {plan.epoch} is for model {plan.model!r}, not {model!r}"
    # The wire checked that stages continue each other from where the first starts.
    if plan.stages[0].start != 0 or plan.stages[-1].end != units:
        ends = f"{plan.stages[0].start}..{plan.stages[-1].end - 1}"
        return f"plan epoch {plan.epoch} covers units {ends}, not 0..{units - 1}"
    devices = [s.device for s in plan.stages]
    if len(set(devices)) != len(devices):
        return f"plan epoch {plan.epoch} gives a device two stages"
    for stage in plan.stages:
        known = member(stage.device)
        if known is None or not known.state.live:
            return f"plan epoch {plan.epoch} gives units to {stage.device}, not a live member here"
        need, has = sum(unit_mem[stage.start : stage.end]), offered(stage.device)
        if has is not None and not fits(need, has):
            return (
                f"plan epoch {plan.epoch} needs {need:.3g} bytes of {stage.device}, "
                f"which offers {has:.3g}"
            )
    return None


def profile_problem(profile: Profile, sender: NodeId, model: str, units: int) -> str | None:
    """Why a profile is refused, or None: it must come from the member it describes, and
    fit the units of a model it says it runs."""
    if profile.id != sender:
        return f"{sender} sent a profile of {profile.id}"
    if profile.model != model:
        return None  # another model: never planned with, harmless
    if len(profile.unit_ms) != units:
        return f"{sender}: {len(profile.unit_ms)} unit times for {units} units"
    if len(profile.batch_ms) > len(BATCHES) or any(len(b) != units for b in profile.batch_ms):
        return f"{sender}: batch times do not fit {len(BATCHES)} sizes of {units} units"
    return None
