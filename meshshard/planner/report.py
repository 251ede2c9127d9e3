"""Plans as text for people: a stage table, the left-out devices, and the baseline comparison."""

from __future__ import annotations

from collections.abc import Sequence

from meshshard.planner.baselines import BASELINES, baseline
from meshshard.planner.cost import SESSIONS, Cost, Stage
from meshshard.planner.dp import OBJECTIVES, Plan, solve
from meshshard.planner.instance import Instance, InstanceError


def unit_range(inst: Instance, stage: Stage) -> str:
    first, last = inst.units[stage.start].name, inst.units[stage.end - 1].name
    return first if first == last else f"{first}..{last}"


def plan_table(inst: Instance, plan: Plan) -> str:
    rows = [("stage", "device", "units", "mem used / avail GB", "compute ms", "hop in ms")]
    for i, s in enumerate(plan.stages):
        used = sum(u.mem for u in inst.units[s.start : s.end])
        rows.append(
            (
                str(i),
                s.device,
                f"{unit_range(inst, s)} ({s.end - s.start})",
                f"{used / 1e9:.3f} / {inst.device(s.device).mem / 1e9:.3f}",
                f"{plan.cost.compute_ms[i]:.3f}",
                "-" if i == 0 else f"{plan.cost.hop_ms[i - 1]:.3f}",
            )
        )
    rows.append(("return", inst.source, "", "", "", f"{plan.cost.return_ms:.3f}"))
    lines = [_format_rows(rows)]
    quality = "exact" if plan.exact else f"approximate, within {plan.bound:.3f}x of optimal"
    lines.append(
        f"objective {plan.objective} ({quality}): latency {plan.cost.latency_ms:.2f} ms/token, "
        f"bottleneck {plan.cost.bottleneck_ms:.2f} ms, {plan.cost.tokens_per_s:.2f} tokens/s "
        f"with {plan.cost.sessions} answers in flight"
    )
    if plan.left_out:
        lines.append("left out:")
        by_reason: dict[str, list[str]] = {}
        for name, why in plan.left_out.items():
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            who = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
            lines.append(f"  {who}: {why}")
    return "\n".join(lines)


def comparison(inst: Instance) -> list[tuple[str, Cost | None, str]]:
    """(method, cost or None, note) for both objectives of ours and every baseline."""
    rows: list[tuple[str, Cost | None, str]] = []
    for objective in OBJECTIVES:
        try:
            plan = solve(inst, objective)
            rows.append((f"ours ({objective})", plan.cost, f"{len(plan.stages)} stages"))
        except InstanceError as e:
            rows.append((f"ours ({objective})", None, str(e)))
    for name in BASELINES:
        try:
            stages, cost = baseline(inst, name)
            rows.append((name, cost, f"{len(stages)} stages"))
        except InstanceError as e:
            rows.append((name, None, str(e)))
    return rows


def comparison_table(inst: Instance) -> str:
    rows = comparison(inst)
    best_latency = min((c.latency_ms for _, c, _ in rows if c), default=None)
    best_rate = max((c.tokens_per_s for _, c, _ in rows if c), default=None)
    sessions = next((c.sessions for _, c, _ in rows if c), SESSIONS)
    rate = f"tokens/s ({sessions} in flight)"
    table = [("method", "latency ms", "vs best", rate, "vs best", "note")]
    for name, cost, note in rows:
        if cost is None or best_latency is None or best_rate is None:
            table.append((name, "-", "", "-", "", note))
            continue
        table.append(
            (
                name,
                f"{cost.latency_ms:.2f}",
                f"{cost.latency_ms / best_latency:.2f}x",
                f"{cost.tokens_per_s:.2f}",
                f"{cost.tokens_per_s / best_rate:.2f}x",
                note,
            )
        )
    return _format_rows(table)


def _format_rows(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
