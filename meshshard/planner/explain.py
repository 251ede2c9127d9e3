"""Why each idle device is not in the plan, in words a person can act on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from meshshard.planner.cost import Cost, Stage, evaluate
from meshshard.planner.groups import GroupModel
from meshshard.planner.instance import Instance

if TYPE_CHECKING:
    from meshshard.planner.dp import Objective, Table

# Differences below this many ms are ties: the device is simply not needed.
_TIE_MS = 1e-6


def left_out(
    inst: Instance,
    model: GroupModel,
    table: Table,
    stages: Sequence[Stage],
    cost: Cost,
    objective: Objective,
) -> dict[str, str]:
    from meshshard.planner.dp import assign

    in_plan = {s.device for s in stages}
    reasons: dict[str, str] = {}
    for g, members in enumerate(model.members):
        idle = [m for m in members if m not in in_plan]
        if not idle:
            continue
        used = len(members) - len(idle)
        alt = table.best(must_use=(g, used))
        if alt is None:
            reason = _cannot_fit(inst, idle[0])
        else:
            alt_stages = assign(model, table.stages(alt))
            alt_cost = evaluate(inst, alt_stages)
            newcomer = next(s for s in alt_stages if s.device == idle[0])
            reason = _compare(inst, stages, cost, alt_stages, alt_cost, newcomer, objective)
        if used:
            reason += f" (a like device, {members[0]}, is in the plan)"
        for name in idle:
            reasons[name] = reason
    return reasons


def _cannot_fit(inst: Instance, name: str) -> str:
    device = inst.device(name)
    smallest = min(u.mem for u in inst.units)
    if device.mem < smallest:
        return f"its memory ({device.mem / 1e9:.3g} GB) holds no unit"
    return "no valid plan includes it"


def _compare(
    inst: Instance,
    stages: Sequence[Stage],
    cost: Cost,
    alt: Sequence[Stage],
    alt_cost: Cost,
    newcomer: Stage,
    objective: Objective,
) -> str:
    i = list(alt).index(newcomer)
    neighbour = alt[i - 1].device
    link = inst.link(neighbour, newcomer.device)
    link_text = f"{link.mbps:g} Mbit/s, {link.ms:g} ms"
    if objective == "throughput":
        n = cost.sessions
        now, with_it = cost.ms_per_token(), alt_cost.ms_per_token(n)
        if with_it - now <= _TIE_MS:
            return f"not needed: {n} answers in flight go as fast without it"
        if alt_cost.latency_ms / n > alt_cost.bottleneck_ms:
            return (
                f"with it a token's way round would take {alt_cost.latency_ms:.2f} ms: "
                f"{n} answers in flight would reach {1000 / with_it:.2f} tokens/s, "
                f"not {1000 / now:.2f}"
            )
        sent = inst.units[newcomer.start - 1].out_bytes
        frame = inst.frame_ms(neighbour, newcomer.device, sent)
        if frame >= alt_cost.bottleneck_ms - _TIE_MS:
            return (
                f"its link ({link_text}) would be the bottleneck: "
                f"{frame:.2f} ms per token vs {now:.2f} ms now"
            )
        return (
            f"with it the bottleneck would be {alt_cost.bottleneck_ms:.2f} ms per token, "
            f"not {now:.2f} ms"
        )
    if alt_cost.latency_ms - cost.latency_ms <= _TIE_MS:
        return "not needed: latency is the same without it"
    extra_hops = (sum(alt_cost.hop_ms) + alt_cost.return_ms) - (sum(cost.hop_ms) + cost.return_ms)
    saved = sum(cost.compute_ms) - sum(alt_cost.compute_ms)
    if abs(saved) <= _TIE_MS:
        return f"one more stage saves no compute and adds {extra_hops:.2f} ms of hops per token"
    if saved > 0:
        return (
            f"its link ({link_text}) costs {extra_hops:.2f} ms per token, "
            f"more than the {saved:.2f} ms its compute saves"
        )
    return (
        f"slower than the devices in the plan: using it adds {-saved:.2f} ms of compute "
        f"and {extra_hops:.2f} ms of hops per token"
    )
