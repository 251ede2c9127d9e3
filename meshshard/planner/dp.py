"""Exact joint device selection and layer partition by dynamic programming.

State: (devices used so far, as a count per group; group of the last stage; next unit).
Every transition adds one stage on an unused device of some group, so a device is used at
most once and memory is checked per stage exactly (nothing is carried greedily). For each
(used, last, next group) the transition is one vectorised min over (stage start, stage end).

Throughput, the steady rate with N answers in flight, is 1 / max(B, L / N) (`cost.py`): the
busiest stage or link per token B, the way round L. Its best plan is the least-latency plan
under some cap on B, the cap where the two bounds cross: the latency DP is run under caps
found by bisection over the values B can take (L under a cap falls as the cap rises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from meshshard.planner.cost import MEM_SLACK, SESSIONS, Cost, Stage, evaluate
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
        """What the objective minimises: ms per token of one answer, or of the chain with
        its answers in flight."""
        return self.cost.latency_ms if self.objective == "latency" else self.cost.ms_per_token()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "objective": self.objective,
            "stages": [{"device": s.device, "start": s.start, "end": s.end} for s in self.stages],
            "latency_ms": round(self.cost.latency_ms, 4),
            "bottleneck_ms": round(self.cost.bottleneck_ms, 4),
            "tokens_per_s": round(self.cost.tokens_per_s, 4),  # with cost.sessions in flight
        }
        if not self.exact:
            out["approximate"] = {"bound": round(self.bound, 4)}
        return out


def solve(
    inst: Instance,
    objective: Objective = "latency",
    mode: Mode = "auto",
    sessions: int = SESSIONS,
) -> Plan:
    """The best plan for the objective (throughput: with `sessions` answers in flight), or
    InstanceError saying why there is none."""
    if objective not in OBJECTIVES:
        raise InstanceError(f"unknown objective {objective!r} (latency or throughput)")
    if sessions < 1:
        raise InstanceError(f"sessions must be at least 1, got {sessions}")
    model = exact_groups(inst)
    if mode == "exact" or (mode == "auto" and work(model.counts) <= STATE_BUDGET):
        return _solve_model(inst, model, objective, sessions)
    return _approximate(inst, objective, sessions)


def _approximate(inst: Instance, objective: Objective, sessions: int) -> Plan:
    """Plan on pessimistic groups (the plan is real and no worse than predicted) and bound the
    optimum from below with optimistic ones: the ratio is the certified bound."""
    pessimistic, optimistic = bucketed_groups(inst, STATE_BUDGET)
    fastest = Table(optimistic, "latency", cap=None).best()
    if fastest is None:
        raise InstanceError(_why_infeasible(inst))
    floor = fastest[0]
    if objective == "throughput":  # neither bound can beat its optimistic minimum
        least = Table(optimistic, "throughput", cap=None).best()
        assert least is not None
        floor = max(least[0], floor / sessions)
    try:
        plan = _solve_model(inst, pessimistic, objective, sessions)
    except InstanceError:
        raise InstanceError(
            "approximate mode found no plan (pessimistic grouping); try --mode exact"
        ) from None
    bound = plan.value() / floor if floor > 0 else math.inf
    return replace(plan, exact=False, bound=max(bound, 1.0))


def _solve_model(inst: Instance, model: GroupModel, objective: Objective, sessions: int) -> Plan:
    first = Table(model, objective, cap=None)
    best = first.best()
    if best is None:
        raise InstanceError(_why_infeasible(inst))
    if objective == "throughput":
        stages = _best_rate(inst, model, best[0], sessions)
    else:
        stages = assign(model, first.stages(best))
    cost = evaluate(inst, stages, sessions=sessions)
    reasons = left_out(inst, model, first, stages, cost, objective)
    return Plan(objective, tuple(stages), cost, left_out=reasons)


def _best_rate(inst: Instance, model: GroupModel, least: float, sessions: int) -> list[Stage]:
    """The plan of the highest rate with `sessions` answers in flight: the least-latency plan
    under the cap where B and L / N cross (or one cap below it), among the values B can take.
    The crossing lies between the least latency / N and the latency under the least
    bottleneck / N, which keeps the bisection short."""

    def least_latency(cap: float | None) -> tuple[list[Stage], Cost]:
        table = Table(model, "latency", cap=None if cap is None else cap * (1 + 1e-9) + 1e-12)
        best = table.best()
        assert best is not None  # the least bottleneck's plan is under every cap
        stages = assign(model, table.stages(best))
        return stages, evaluate(inst, stages, sessions=sessions)

    tightest = least_latency(least)
    if tightest[1].latency_ms / sessions <= least:
        return tightest[0]  # the busiest stage limits, and nothing beats the least one
    fastest = least_latency(None)
    if fastest[1].bottleneck_ms <= least * (1 + 1e-9):
        return fastest[0]
    # Caps below L_min / N cannot be the crossing (L >= L_min there), nor caps above both
    # the fastest plan's own bottleneck and L(least) / N; keep one cap on either side.
    caps = bottleneck_values(model, least)
    low = max(least, fastest[1].latency_ms / sessions)
    high = min(fastest[1].bottleneck_ms, tightest[1].latency_ms / sessions)
    first = max(int(np.searchsorted(caps, low * (1 - 1e-9))) - 1, 0)
    last = min(int(np.searchsorted(caps, high * (1 + 1e-9))), len(caps) - 1)
    plans: dict[int, tuple[list[Stage], Cost]] = {}

    def under(i: int) -> tuple[list[Stage], Cost]:
        if i not in plans:
            plans[i] = least_latency(float(caps[i]))
        return plans[i]

    lo, hi = first, last  # the first cap whose least latency L has L / N <= cap
    while lo < hi:
        mid = (lo + hi) // 2
        if under(mid)[1].latency_ms / sessions <= caps[mid]:
            hi = mid
        else:
            lo = mid + 1
    tried = [tightest, fastest, *(under(i) for i in {max(lo - 1, first), lo})]
    stages, _ = min(tried, key=lambda p: (p[1].ms_per_token(), p[1].latency_ms))
    return stages


def bottleneck_values(model: GroupModel, least: float) -> NDArray[np.float64]:
    """Every value a plan's bottleneck can take, from `least` up, sorted: a stage's compute
    (any unit range on any group) or a frame's time on any link, the token's return too."""
    values = [c[None, :] - c[:, None] for c in model.cum_ms]
    bytes_before = np.concatenate([[0.0], model.out_bytes, [model.return_bytes]])
    values.append(bytes_before[None, None, :] * 8 / (model.link_mbps[:, :, None] * 1000))
    flat = np.concatenate([v.ravel() for v in values])
    keep = flat[np.isfinite(flat) & (flat >= least * (1 - 1e-9))]
    return np.unique(np.append(keep, least))


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
        # A hop's delay adds to the latency; only its frame's time keeps the link busy, so
        # only that counts toward a bottleneck (and is held to the cap).
        bytes_before = np.concatenate([[0.0], model.out_bytes])  # activation into a stage at j
        frames = bytes_before[None, None, :] * 8 / (model.link_mbps[:, :, None] * 1000)
        hops = np.where(frames <= limit, model.link_ms[:, :, None] + frames if add else frames, inf)
        hops[:, :, 0] = inf
        ret_frame = model.return_bytes * 8 / (model.link_mbps[:, 0] * 1000)
        ret = model.link_ms[:, 0] + ret_frame if add else ret_frame
        ret[0] = ret_frame[0] = 0.0
        self.ret = np.where(ret_frame <= limit, ret, inf)

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
