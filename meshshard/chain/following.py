"""How a stage follows plans, pure: what to load for a plan, when to switch to it, and what
to do with a step of a given epoch. The driver (`follower.py`) loads, switches and serves."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshshard.types import Epoch, NodeId, PlanRecord


@dataclass(frozen=True)
class NoUnits:
    """The plan gives this peer nothing: it is ready for it at once."""


@dataclass(frozen=True)
class Reuse:
    """A shard this peer holds (serving or prepared) has exactly the plan's units."""

    start: int
    end: int


@dataclass(frozen=True)
class Load:
    start: int
    end: int


@dataclass(frozen=True)
class WaitNext:
    """The next stage is not a live member: wait for a newer plan."""

    node: NodeId


Preparation = NoUnits | Reuse | Load | WaitNext


def prepare(
    plan: PlanRecord, me: NodeId, held: list[tuple[int, int]], next_live: bool
) -> Preparation:
    """What `plan` asks of this peer, given the unit ranges of the shards it holds and
    whether the stage after its own is on a live member."""
    mine = plan.stage_of(me)
    if mine is None:
        return NoUnits()
    index = plan.stages.index(mine)
    if index + 1 < len(plan.stages) and not next_live:
        return WaitNext(plan.stages[index + 1].device)
    if (mine.start, mine.end) in held:
        return Reuse(mine.start, mine.end)
    return Load(mine.start, mine.end)


def standby(plan: PlanRecord, me: NodeId) -> tuple[int, int] | None:
    """The units a spare preloads for `plan` (a warm standby): those its fallbacks give it
    most often, the earliest fallback's on a tie. None for a peer the plan gives units (its
    memory is its stage's) or that no fallback uses."""
    if plan.stage_of(me) is not None:
        return None
    given = [(s.start, s.end) for f in plan.fallbacks for s in f.stages if s.device == me]
    return max(given, key=given.count, default=None)


def switch_now(chain_ready: bool, serving: bool) -> bool:
    """Switch to a prepared plan once its whole chain is ready; a peer that serves nothing
    switches at once (it keeps no one waiting). A step of the new epoch also switches."""
    return chain_ready or not serving


class Step(enum.Enum):
    SWITCH_AND_SERVE = "switch"  # a step of the prepared plan: its origin saw the chain ready
    SERVE = "serve"
    STALE = "stale"  # older than the plan this peer follows
    NOT_READY = "not-ready"  # newer than what this peer serves: still loading


def step_verdict(
    epoch: Epoch, serving: Epoch | None, prepared: Epoch | None, following: Epoch | None
) -> Step:
    """What to do with a step of `epoch` when this peer serves `serving`, has `prepared` a
    newer plan, and follows the plan of epoch `following`."""
    if prepared is not None and epoch == prepared:
        return Step.SWITCH_AND_SERVE
    if serving is not None and epoch == serving:
        return Step.SERVE
    if following is not None and epoch < following:
        return Step.STALE
    return Step.NOT_READY
