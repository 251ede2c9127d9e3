"""The coordinator's decision, pure: whether to replan now, and why.

The driver (`node.py`) gathers a view of the mesh, asks `decide`, and carries a Replan out
(it makes the plan, and publishes it unless `worth_publishing` says the plan in force is
still as good). The Replanner holds the one piece of state: when the inputs last changed,
and what the last plan was made on (the debounce)."""

from __future__ import annotations

from dataclasses import dataclass

from meshshard.mesh.coordinator import Replanner, Signature, describe_change
from meshshard.types import NodeId, PlanRecord


@dataclass(frozen=True)
class View:
    me: NodeId
    coordinator: NodeId | None
    leaving: bool
    live: frozenset[NodeId]  # members to plan with that serve (not leaving, not excluded)
    signature: Signature  # what a plan depends on, rounded
    pinned: tuple[NodeId, ...] | None  # the members an operator's plan was made for
    current: PlanRecord | None  # the plan in force
    unwell: str  # the plan in force's stages gone, suspected or leaving, in words


@dataclass(frozen=True)
class Keep:
    """No new plan now. `unpin`: an operator's plan no longer stands."""

    why: str
    unpin: bool = False


@dataclass(frozen=True)
class Replan:
    reason: str  # what an operator reads in the plan's record
    ours: bool  # the plan in force is ours and every stage of it still serves


Decision = Keep | Replan


def decide(view: View, now: float, replanner: Replanner) -> Decision:
    if view.leaving:
        return Keep("leaving the mesh")
    if view.coordinator != view.me:
        replanner.forget()
        return Keep("not the coordinator", unpin=True)
    unpin = False
    if view.pinned is not None:
        if view.signature.members == view.pinned:
            return Keep("an operator's plan stands until the members change")
        unpin = True
    current = view.current
    # A draining member still serves, but a plan that uses it is on borrowed time.
    stages = {s.device for s in current.stages} if current is not None else set()
    mine = current is not None and current.epoch.coordinator == view.me and stages <= view.live
    broken = current is not None and not stages <= view.live
    if not replanner.due(view.signature, now, mine, urgent=broken):
        return Keep("nothing changed, or not for long enough", unpin)
    ours = current is not None and current.epoch.coordinator == view.me
    reason = describe_change(replanner.planned, view.signature) if ours else "new coordinator"
    if current is not None and view.unwell:
        reason = view.unwell  # what an operator wants to know, whatever else changed
    replanner.done(view.signature)
    return Replan(reason, mine)


def worth_publishing(replan: Replan, settled: bool, better: bool) -> bool:
    """Publish the new plan unless the plan in force is ours, still serves, was not made on
    estimated profiles since measured (`settled`), and the new one is not `better` by the
    replan threshold: moving shards costs a reload and answers in flight."""
    return not (replan.ours and settled and not better)
