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

    def states(self) -> int:
        return math.prod(c + 1 for c in self.counts[1:])


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


def bucketed_groups(inst: Instance, ratio: float) -> tuple[GroupModel, GroupModel]:
    """(pessimistic, optimistic) models of devices bucketed within a factor `ratio` per feature."""
    by_key: dict[tuple[int, ...], list[str]] = {}
    step = math.log(ratio) if ratio > 1 else 0.0
    for d in inst.devices:
        if d.name == inst.source:
            continue
        others = [o.name for o in inst.devices if o.name != d.name]
        features = (
            d.mem,
            sum(d.ms) + 1e-9,
            inst.link(d.name, inst.source).hop_ms(1e5) + 1e-9,
            sum(inst.link(d.name, o).hop_ms(1e5) for o in others) / max(len(others), 1) + 1e-9,
        )
        key = tuple(
            0 if step == 0 else math.floor(math.log(max(f, 1e-12)) / step) for f in features
        )
        by_key.setdefault(key, []).append(d.name)
    groups = [(inst.source,)] + [tuple(v) for _, v in sorted(by_key.items())]
    return _model(inst, groups, pessimistic=True), _model(inst, groups, pessimistic=False)


def _identical(inst: Instance, group: list[str], name: str) -> bool:
    rep, dev = inst.device(group[0]), inst.device(name)
    if rep.mem != dev.mem or rep.ms != dev.ms:
        return False
    if len(group) > 1 and inst.link(name, rep.name) != inst.link(group[1], rep.name):
        return False
    return all(
        inst.link(name, o.name) == inst.link(rep.name, o.name)
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
