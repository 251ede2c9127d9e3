"""Devices grouped so the planner's state space stays small.

Exact grouping puts together devices with the same memory, the same compute times and the
same links to everyone else. Approximate grouping (for large meshes of different devices)
buckets similar devices and gives each group a pessimistic and an optimistic profile: a plan
found with the pessimistic one is real and no worse than predicted, and the optimistic one
bounds the optimum from below, so the gap between them is a certified bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from meshshard.planner.instance import Instance

Array = NDArray[np.float64]


@dataclass(frozen=True)
class GroupModel:
    """What the DP needs, per group: how many members, memory, compute prefix sums, links."""

    members: tuple[tuple[str, ...], ...]  # group 0 is the source alone
    mem: Array  # [G]
    cum_ms: Array  # [G, n+1]: cum_ms[g, k] = time of units [0, k) on group g
    link_ms: Array  # [G, G] per-message latency between members of two groups
    link_mbps: Array  # [G, G]
    unit_mem_cum: Array  # [n+1]
    out_bytes: Array  # [n]
    return_bytes: float

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(len(m) for m in self.members)


def exact_groups(inst: Instance) -> GroupModel:
    source = inst.device(inst.source)
    groups: list[list[str]] = [[source.name]]
    for d in inst.devices:
        if d.name == source.name:
            continue
        for g in groups[1:]:
            if _identical(inst, g, d.name):
                g.append(d.name)
                break
        else:
            groups.append([d.name])
    return _model(inst, [tuple(g) for g in groups], pessimistic=True)


def bucketed_groups(inst: Instance, budget: int) -> tuple[GroupModel, GroupModel]:
    """(pessimistic, optimistic) models of the finest grouping whose DP work fits `budget`.

    Starts from exact groups merged into one, then keeps splitting the group whose members
    differ most (on memory, compute, and link quality) at its median, while the work fits.
    """
    features = _features(inst)
    groups: list[list[str]] = [[d.name for d in inst.devices if d.name != inst.source]]
    groups = [g for g in groups if g]
    while True:
        spread, widest, axis = max(
            ((_spread(features, g)[0], i, _spread(features, g)[1]) for i, g in enumerate(groups)),
            default=(0.0, -1, 0),
        )
        if spread <= 1e-9:
            break
        members = sorted(groups[widest], key=lambda m: (features[m][axis], m))
        half = len(members) // 2
        trial = [*groups[:widest], members[:half], members[half:], *groups[widest + 1 :]]
        if work([1, *(len(g) for g in trial)]) > budget:
            break
        groups = trial
    named = [(inst.source,), *(tuple(sorted(g, key=inst.index)) for g in groups)]
    return _model(inst, named, pessimistic=True), _model(inst, named, pessimistic=False)


def work(counts: list[int] | tuple[int, ...]) -> int:
    """DP transitions for groups of these sizes: (used vectors) x (last group) x (next group)."""
    return math.prod(c + 1 for c in counts[1:]) * len(counts) ** 2


def _features(inst: Instance) -> dict[str, tuple[float, ...]]:
    """Log-scale traits that decide a device's worth in a plan."""
    out = {}
    for d in inst.devices:
        others = [o.name for o in inst.devices if o.name != d.name] or [d.name]
        hop = [inst.link(d.name, o).hop_ms(65536) for o in others]
        out[d.name] = tuple(
            math.log(max(x, 1e-12))
            for x in (
                d.mem,
                sum(d.ms),
                inst.hop_ms(d.name, inst.source, 65536) + 1e-9,
                max(hop) + 1e-9,
                min(hop) + 1e-9,
            )
        )
    return out


def _spread(features: dict[str, tuple[float, ...]], group: list[str]) -> tuple[float, int]:
    """The widest trait of a group: (max - min of its log, which trait)."""
    if len(group) < 2:
        return 0.0, 0
    axes = len(next(iter(features.values())))
    spans = [
        max(features[m][a] for m in group) - min(features[m][a] for m in group) for a in range(axes)
    ]
    axis = max(range(axes), key=lambda a: spans[a])
    return spans[axis], axis


def _identical(inst: Instance, group: list[str], name: str) -> bool:
    rep, dev = inst.device(group[0]), inst.device(name)
    if rep.mem != dev.mem or rep.ms != dev.ms:
        return False
    # Within a group every link, either way, is the same one.
    inner = inst.link(group[1], rep.name) if len(group) > 1 else inst.link(name, rep.name)
    if any(inst.link(name, m) != inner or inst.link(m, name) != inner for m in group):
        return False
    return all(
        inst.link(name, o.name) == inst.link(rep.name, o.name)
        and inst.link(o.name, name) == inst.link(o.name, rep.name)
        for o in inst.devices
        if o.name not in (name, rep.name)
    )


def _model(inst: Instance, groups: list[tuple[str, ...]], pessimistic: bool) -> GroupModel:
    worst = max if pessimistic else min
    best = min if pessimistic else max
    n, count = inst.n, len(groups)
    mem = np.array([best(inst.device(m).mem for m in g) for g in groups])
    ms = np.array([[worst(inst.device(m).ms[i] for m in g) for i in range(n)] for g in groups])
    cum_ms = np.concatenate([np.zeros((count, 1)), np.cumsum(ms, axis=1)], axis=1)
    link_ms = np.zeros((count, count))
    link_mbps = np.ones((count, count))
    for a in range(count):
        for b in range(count):
            links = [inst.link(x, y) for x in groups[a] for y in groups[b] if x != y] or [
                inst.default_link
            ]
            link_ms[a, b] = worst(k.ms for k in links)
            link_mbps[a, b] = best(k.mbps for k in links)
    unit_mem = np.array([u.mem for u in inst.units])
    return GroupModel(
        members=tuple(groups),
        mem=mem,
        cum_ms=cum_ms,
        link_ms=link_ms,
        link_mbps=link_mbps,
        unit_mem_cum=np.concatenate([[0.0], np.cumsum(unit_mem)]),
        out_bytes=np.array([u.out_bytes for u in inst.units]),
        return_bytes=inst.return_bytes,
    )
