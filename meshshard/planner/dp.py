"""Exact joint device selection and layer partition by dynamic programming.

State: (devices used so far, as a count per group; group of the last stage; next unit).
Every transition adds one stage on an unused device of some group, so a device is used at
most once and memory is checked per stage exactly (nothing is carried greedily). For each
(used, last, next group) the transition is one vectorised min over (stage start, stage end).

Throughput is solved lexicographically: the least bottleneck first, then the least latency
among plans that reach it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from meshshard.planner.cost import MEM_SLACK, Cost, Stage, evaluate
from meshshard.planner.explain import left_out
from meshshard.planner.groups import GroupModel, bucketed_groups, exact_groups, work
from meshshard.planner.instance import Instance, InstanceError

Objective = Literal["latency", "throughput"]
Mode = Literal["auto", "exact", "approx"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "throughput")

# Above this many (used, last, next) transitions, `auto` switches to approximate grouping.
STATE_BUDGET = 100_000


@dataclass(frozen=True)
class Plan:
    objective: Objective
    stages: tuple[Stage, ...]
    cost: Cost
    exact: bool = True
    # Certified: cost <= bound * optimum of the objective (1.0 when exact).
    bound: float = 1.0
    left_out: dict[str, str] = field(default_factory=dict)

    def value(self) -> float:
        return self.cost.latency_ms if self.objective == "latency" else self.cost.bottleneck_ms

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "objective": self.objective,
            "stages": [{"device": s.device, "start": s.start, "end": s.end} for s in self.stages],
            "latency_ms": round(self.cost.latency_ms, 4),
            "bottleneck_ms": round(self.cost.bottleneck_ms, 4),
            "tokens_per_s": round(self.cost.tokens_per_s, 4),
        }
        if not self.exact:
            out["approximate"] = {"bound": round(self.bound, 4)}
        return out


def solve(inst: Instance, objective: Objective = "latency", mode: Mode = "auto") -> Plan:
    """The best plan for the objective, or InstanceError saying why there is none."""
    if objective not in OBJECTIVES:
        raise InstanceError(f"unknown objective {objective!r} (latency or throughput)")
    model = exact_groups(inst)
    if mode == "exact" or (mode == "auto" and work(model.counts) <= STATE_BUDGET):
        return _solve_model(inst, model, objective)
    return _approximate(inst, objective)


def _approximate(inst: Instance, objective: Objective) -> Plan:
    """Plan on pessimistic groups (the plan is real and no worse than predicted) and bound the
    optimum from below with optimistic ones: the ratio is the certified bound."""
    pessimistic, optimistic = bucketed_groups(inst, STATE_BUDGET)
    floor = Table(optimistic, objective, cap=None).best()
    if floor is None:
        raise InstanceError(_why_infeasible(inst))
    try:
        plan = _solve_model(inst, pessimistic, objective)
    except InstanceError:
        raise InstanceError(
            "approximate mode found no plan (pessimistic grouping); try --mode exact"
        ) from None
    bound = plan.value() / floor[0] if floor[0] > 0 else math.inf
    return replace(plan, exact=False, bound=max(bound, 1.0))


def _solve_model(inst: Instance, model: GroupModel, objective: Objective) -> Plan:
    first = table = Table(model, objective, cap=None)
    best = table.best()
    if best is None:
        raise InstanceError(_why_infeasible(inst))
    if objective == "throughput":
        bottleneck = best[0]
        # Among plans with that bottleneck, the least latency.
        table = Table(model, "latency", cap=bottleneck * (1 + 1e-9) + 1e-12)
        best = table.best()
        assert best is not None
    stages = assign(model, table.stages(best))
    cost = evaluate(inst, stages)
    reasons = left_out(inst, model, first, stages, cost, objective)
    return Plan(objective, tuple(stages), cost, left_out=reasons)


def assign(model: GroupModel, group_stages: list[tuple[int, int, int]]) -> list[Stage]:
    """Concrete devices for group stages: members of a group in instance order."""
    taken = [0] * len(model.members)
    out = []
    for g, start, end in group_stages:
        out.append(Stage(model.members[g][taken[g]], start, end))
        taken[g] += 1
    return out


class Table:
    """The DP over (used counts, last group, next unit) for one additive or bottleneck objective."""

    def __init__(self, model: GroupModel, objective: Objective, cap: float | None) -> None:
        self.model = model
        counts = model.counts
        groups, n = len(counts), len(model.out_bytes)
        self.strides = [1] * groups
        for g in range(1, groups):
            self.strides[g] = self.strides[g - 1] * (counts[g - 1] + 1)
        size = self.strides[-1] * (counts[-1] + 1)
        self.used = _count_vectors(counts, self.strides, size)
        inf = math.inf
        limit = inf if cap is None else cap
        self.f = np.full((size, groups, n + 1), inf)
        self.pred_j = np.full((size, groups, n + 1), -1, dtype=np.int64)
        self.pred_g = np.full((size, groups, n + 1), -1, dtype=np.int64)
        add = objective == "latency"

        mem_cum = model.unit_mem_cum
        span_mem = mem_cum[None, :] - mem_cum[:, None]  # [j, k]
        later = np.arange(n + 1)[None, :] > np.arange(n + 1)[:, None]
        spans = []
        for g in range(groups):
            c = model.cum_ms[g]
            s = c[None, :] - c[:, None]
            ok = later & (span_mem <= model.mem[g] * (1 + MEM_SLACK)) & (s <= limit)
            spans.append(np.where(ok, s, inf))
        bytes_before = np.concatenate([[0.0], model.out_bytes])  # activation into a stage at j
        hops = model.link_ms[:, :, None] + bytes_before[None, None, :] * 8 / (
            model.link_mbps[:, :, None] * 1000
        )
        hops = np.where(hops <= limit, hops, inf)
        hops[:, :, 0] = inf
        ret = model.link_ms[:, 0] + model.return_bytes * 8 / (model.link_mbps[:, 0] * 1000)
        ret[0] = 0.0
        self.ret = np.where(ret <= limit, ret, inf)

        start = self.strides[0]  # the source alone
        self.f[start, 0] = spans[0][0]
        self.pred_j[start, 0] = 0
        order = sorted(range(size), key=lambda u: (int(self.used[u].sum()), u))
        self.order = [u for u in order if self.used[u][0] == 1]
        all_spans = np.stack(spans)  # [group, start, end]
        strides = np.array(self.strides)
        used = self.used.tolist()
        for u in self.order:
            free = np.array([g for g in range(groups) if used[u][g] < counts[g]], dtype=np.int64)
            if free.size == 0:
                continue
            targets = u + strides[free]
            for last in range(groups):
                row = self.f[u, last, :n]
                js = np.flatnonzero(row < inf)
                if js.size == 0:
                    continue
                hop = hops[last][free[:, None], js[None, :]]  # [free, start]
                span = all_spans[free[:, None], js[None, :]]  # [free, start, end]
                if add:
                    cand = (row[js][None, :] + hop)[:, :, None] + span
                else:
                    cand = np.maximum(np.maximum(row[js][None, :], hop)[:, :, None], span)
                arg = cand.argmin(axis=1)  # best start for each (group, end)
                vals = np.take_along_axis(cand, arg[:, None, :], axis=1)[:, 0, :]
                current = self.f[targets, free]
                better = vals < current
                if better.any():
                    self.f[targets, free] = np.where(better, vals, current)
                    self.pred_j[targets, free] = np.where(
                        better, js[arg], self.pred_j[targets, free]
                    )
                    self.pred_g[targets, free] = np.where(better, last, self.pred_g[targets, free])
        final = self.f[:, :, n]
        self.total = final + self.ret[None, :] if add else np.maximum(final, self.ret[None, :])

    def best(self, must_use: tuple[int, int] | None = None) -> tuple[float, int, int] | None:
        """(value, used index, last group) of the best complete plan; optionally one that uses
        more than `must_use[1]` members of group `must_use[0]`."""
        found: tuple[float, int, int] | None = None
        for u in self.order:
            if must_use is not None and self.used[u][must_use[0]] <= must_use[1]:
                continue
            for g in range(len(self.model.members)):
                v = float(self.total[u, g])
                if math.isfinite(v) and (found is None or v < found[0]):
                    found = (v, u, g)
        return found

    def stages(self, best: tuple[float, int, int]) -> list[tuple[int, int, int]]:
        _, u, g = best
        k = len(self.model.out_bytes)
        out = []
        while True:
            j = int(self.pred_j[u, g, k])
            prev = int(self.pred_g[u, g, k])
            out.append((g, j, k))
            if prev < 0:
                return out[::-1]
            u, g, k = u - self.strides[g], prev, j


def _count_vectors(counts: tuple[int, ...], strides: list[int], size: int) -> NDArray[np.int64]:
    idx = np.arange(size)
    return np.stack([(idx // s) % (c + 1) for s, c in zip(strides, counts, strict=True)], axis=1)


def _why_infeasible(inst: Instance) -> str:
    total = sum(u.mem for u in inst.units)
    capacity = sum(d.mem for d in inst.devices)
    biggest = max(inst.units, key=lambda u: u.mem)
    if total > capacity * (1 + MEM_SLACK):
        return (
            f"model does not fit: needs {_mb(total)}, "
            f"the {len(inst.devices)} device(s) together have {_mb(capacity)}"
        )
    if not any(d.mem >= biggest.mem for d in inst.devices):
        return f"unit {biggest.name} ({_mb(biggest.mem)}) fits on no device"
    first = inst.units[0]
    if inst.device(inst.source).mem < first.mem:
        return f"the source {inst.source!r} cannot hold the first unit {first.name}"
    return "no plan fits: memory is too fragmented across devices for contiguous stages"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n:,.0f} bytes"
