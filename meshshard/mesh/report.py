"""What a peer says of the mesh, for people: the status object of `GET /status`, the
dashboard and `meshshard status` (members, links, plan and its prediction under today's
numbers, why idle members are idle, history, events)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from meshshard.mesh.coordinator import mesh_instance
from meshshard.planner import InstanceError, Stage, evaluate
from meshshard.planner.cost import SESSIONS, Cost, per_token_ms
from meshshard.planner.flow import (
    PLAIN,
    FlowStage,
    Overhead,
    Pace,
    Speculation,
    alone,
    flow_stages,
    latency_ms,
    tokens_per_s,
    waved,
    waves_by,
)
from meshshard.planner.headsplit import head_saving_ms, head_share, wave_head, wave_head_ms
from meshshard.planner.instance import Instance
from meshshard.types import PlanRecord, PlanStage, Profile, State

if TYPE_CHECKING:
    from meshshard.mesh.node import ControlNode

# Answers in flight that status predicts tokens/s for.
FLOW_SESSIONS = (1, 2, 4, 6, 8, 16)


def status(node: ControlNode, spec: Speculation = PLAIN) -> dict[str, Any]:
    """`spec`: this peer's answers' speculation so far, to price the plan's passes at."""
    plan = node.book.current
    shard = {s.device: [s.start, s.end] for s in plan.stages} if plan else {}
    return {
        "id": node.id,
        "coordinator": node.coordinator,
        "epoch": [plan.epoch.term, plan.epoch.coordinator] if plan else None,
        "members": [
            {
                "id": m.id,
                "addr": m.addr,
                "state": m.state.value,
                "draining": m.draining,
                "incarnation": m.incarnation,
                "priority": m.priority,
                "mem": node.profiles[m.id].mem if m.id in node.profiles else None,
                "device": node.profiles[m.id].device if m.id in node.profiles else None,
                "measured": node.profiles[m.id].measured if m.id in node.profiles else None,
                "shard": shard.get(m.id),
                "ready": bool(plan and m.ready == plan.epoch),
                **_load(node.profiles.get(m.id)),
            }
            for m in node.membership.members()
        ],
        "links": [
            {"a": a, "b": b, "mbps": round(stat.mbps, 2), "rtt_ms": round(stat.rtt_ms, 3)}
            for a, p in sorted(node.profiles.items())
            for b, stat in sorted(p.links.items())
        ],
        "plan": plan_json(plan) if plan else None,
        "predicted_now": predicted_now(node, plan, spec),
        "chain_ready": bool(plan and node.chain_ready(plan)),
        "plan_error": node.plan_error,
        "introductions": {
            "pending": node._seeds.waiting({m.addr for m in node.membership.live()}),
            "tried": node._seeds.tries,
        },
        "excluded": sorted(node.excluded),
        "idle": idle_reasons(node, plan),
        "history": [plan_json(p) for p in node.book.history],
        "events": [e.to_json() for e in node.events.since(0)],
    }


def idle_reasons(node: ControlNode, plan: PlanRecord | None) -> dict[str, str]:
    """Why each member outside the plan in force is outside it."""
    if plan is None:
        return {}
    planner = dict(plan.left_out)
    out: dict[str, str] = {}
    for m in node.membership.members():
        if plan.stage_of(m.id) is not None or m.state in (State.DEAD, State.LEFT):
            continue
        profile = node.profiles.get(m.id)
        if m.id in planner:
            out[m.id] = planner[m.id]
        elif m.id in node.excluded:
            out[m.id] = "excluded by the operator"
        elif m.draining:
            out[m.id] = "leaving the mesh"
        elif profile is None or profile.model != node.model:
            out[m.id] = "its profile for this model has not arrived yet"
        elif m.state == State.SUSPECT:
            out[m.id] = "suspected of having failed"
        else:
            out[m.id] = "joined after this plan was made"
    return out


def _instance(node: ControlNode, plan: PlanRecord) -> Instance | None:
    """The plan's instance under today's profiles and measured links (None where it cannot
    be built)."""
    try:
        return mesh_instance(
            node.membership.members(),
            node.profiles,
            node.units,
            node.model,
            plan.stages[0].device,
            node.context_tokens,
        )
    except InstanceError:
        return None


class PlanFlow(NamedTuple):
    """A plan as the flow model takes it: its cost, its stages (a wave's head at the first
    stage where the plan says so), the token's way back, and the stages as one answer alone
    runs them (with the head split where the plan says so, its passes verifying drafts too)."""

    cost: Cost
    flow: tuple[FlowStage, ...]
    back: float
    lone: tuple[FlowStage, ...]


def plan_flow(node: ControlNode, plan: PlanRecord) -> PlanFlow | None:
    """The plan under today's profiles and measured links (None where the instance cannot
    be built)."""
    if (inst := _instance(node, plan)) is None:
        return None
    stages = [Stage(s.device, s.start, s.end) for s in plan.stages]
    try:
        cost = evaluate(inst, stages)
    except InstanceError:
        return None
    pace, batch_ms = _paces(node), _batch_ms(node)
    beyond: dict[str, Overhead] = {
        n: Overhead(p.overhead_ms, p.pass_overhead_ms) for n, p in node.profiles.items()
    }
    flow, back = flow_stages(inst, stages, batch_ms, beyond, pace)
    share = plan.head_share
    saving = head_saving_ms(inst, stages, pace, batch_ms, share) if share else ()
    lone = alone(flow, saving) if saving else flow
    if plan.wave_head:
        flow = waved(flow, *wave_head_ms(inst, stages, pace, batch_ms))
    return PlanFlow(cost, flow, back, lone)


def plan_head_share(node: ControlNode, plan: PlanRecord) -> float:
    """The share of a tied head the plan's first stage scores for a lone answer's step,
    under today's profiles and links (planner/headsplit.py)."""
    if (inst := _instance(node, plan)) is None:
        return 0.0
    stages = [Stage(s.device, s.start, s.end) for s in plan.stages]
    return head_share(inst, stages, _paces(node))


def _batch_ms(node: ControlNode) -> dict[str, Sequence[Sequence[float]]]:
    return {n: p.batch_ms for n, p in node.profiles.items()}


def _paces(node: ControlNode) -> dict[str, Pace]:
    return {n: Pace(p.pace, p.batch_pace) for n, p in node.profiles.items()}


def plan_waves(node: ControlNode, plan: PlanRecord) -> PlanRecord:
    """The plan with the waves its stages spread their sessions over, under today's profiles:
    the fastest for the answers in flight its throughput is for (`waves`), and for fewer
    answers decoding where fewer waves are faster (`flow.waves_by`, tens of ms each). Its
    first stage scores every wave's head where that saves the last stage enough
    (planner/headsplit.py) and the waves so priced go round faster than the waves without
    it; in several waves the first stage then scores each wave's head between its passes.
    Counts by answers decoding, not by answers asked: a wave of more rows than a count
    allows leaves the rest for a pass of their own, and a stage holds a batch for steps due
    within a pass."""
    got = plan_flow(node, replace(plan, wave_head=False))
    if got is None or (inst := _instance(node, plan)) is None:
        return replace(plan, waves=1, waves_by=(), wave_head=False)
    stages = [Stage(s.device, s.start, s.end) for s in plan.stages]
    sessions = got.cost.sessions
    by = waves_by(got.flow, got.back, sessions)
    head = wave_head(inst, stages, sessions, _paces(node), _batch_ms(node))
    if head and (moved := plan_flow(node, replace(plan, wave_head=True))) is not None:
        by_moved = waves_by(moved.flow, moved.back, sessions)
        rate = tokens_per_s(got.flow, got.back, sessions, waves=by)
        if tokens_per_s(moved.flow, moved.back, sessions, waves=by_moved) >= rate:
            return _with_waves(plan, by_moved, wave_head=True)
    return _with_waves(plan, by, wave_head=False)


def _with_waves(plan: PlanRecord, by: tuple[int, ...], wave_head: bool) -> PlanRecord:
    return replace(plan, waves=by[-1], waves_by=by if len(by) > 1 else (), wave_head=wave_head)


def predicted_now(
    node: ControlNode, plan: PlanRecord | None, spec: Speculation = PLAIN
) -> dict[str, Any] | None:
    """The plan in force under today's profiles, measured links and per-step costs (its
    record keeps the numbers it was made on), stage by stage; and, where answers speculate,
    one answer's rate at passes of `spec`'s positions and tokens."""
    if plan is None or (got := plan_flow(node, plan)) is None:
        return None
    cost, flow, back, lone = got  # lone: one answer alone
    waves = plan.wave_counts  # what the stages run
    return {
        "latency_ms": round(latency_ms(lone, back), 3),
        "bottleneck_ms": round(cost.bottleneck_ms, 3),
        "tokens_per_s": round(cost.tokens_per_s, 2),
        "sessions": cost.sessions,
        "compute_ms": [round(x, 3) for x in cost.compute_ms],
        "overhead_ms": [round(s.overhead_ms, 3) for s in flow],
        "pass_overhead_ms": [round(s.pass_overhead_ms, 3) for s in flow],
        "batch_ms": [[round(x, 3) for x in s.batch_ms] for s in flow],
        "hop_ms": [round(x, 3) for x in cost.hop_ms],
        "return_ms": round(cost.return_ms, 3),
        # What that many answers at once would reach, batched and spread over waves as our
        # stages run them.
        "tokens_per_s_at": {
            str(n): round(tokens_per_s(lone if n == 1 else flow, back, n, waves=waves), 2)
            for n in FLOW_SESSIONS
        },
        "waves": plan.waves,
        "waves_by": list(plan.waves_by),
        "wave_head": plan.wave_head,
        "speculating": None
        if spec == PLAIN
        else {
            "positions_per_pass": round(spec.positions, 2),
            "tokens_per_pass": round(spec.tokens, 2),
            "latency_ms": round(latency_ms(lone, back, spec), 3),
            "tokens_per_s": round(tokens_per_s(lone, back, 1, spec=spec), 2),
        },
    }


def plan_json(plan: PlanRecord) -> dict[str, Any]:
    return {
        "epoch": [plan.epoch.term, plan.epoch.coordinator],
        "objective": plan.objective,
        "stages": _stages_json(plan.stages),
        "latency_ms": round(plan.latency_ms, 3),
        "bottleneck_ms": round(plan.bottleneck_ms, 3),
        "tokens_per_s": round(1000 / per_token_ms(plan.bottleneck_ms, plan.latency_ms, SESSIONS), 2)
        if plan.bottleneck_ms
        else 0.0,
        "reason": plan.reason,
        "left_out": dict(plan.left_out),
        "fallbacks": {f.lost: _stages_json(f.stages) for f in plan.fallbacks},
        "waves": plan.waves,
        "waves_by": list(plan.waves_by),
        "head_share": plan.head_share,
        "wave_head": plan.wave_head,
    }


def _stages_json(stages: Sequence[PlanStage]) -> list[dict[str, Any]]:
    return [{"device": s.device, "start": s.start, "end": s.end} for s in stages]


def _load(profile: Profile | None) -> dict[str, Any]:
    if profile is None:
        return {
            "sessions": None,
            "step_ms": None,
            "used": None,
            "overhead_ms": None,
            "pass_overhead_ms": None,
            "pace": None,
            "batch_pace": None,
        }
    return {
        "sessions": profile.load,
        "step_ms": round(profile.step_ms, 3),
        "used": profile.used,
        "overhead_ms": round(profile.overhead_ms, 3),
        "pass_overhead_ms": round(profile.pass_overhead_ms, 3),
        "pace": round(profile.pace, 3),
        "batch_pace": round(profile.batch_pace, 3),
    }
