"""The plans MeshShard is compared against, under the same cost model.

solo: the whole model on the source. even: equal units over every device. memory-weighted:
units in proportion to memory, as exo does. edgeshard-greedy: the paper's latency DP over
(unit, device) that carries remaining memory greedily along the best path and may revisit a
device; it is evaluated as it is, revisits included.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from meshshard.planner.cost import Cost, Stage, evaluate, fits
from meshshard.planner.instance import Device, Instance, InstanceError

BASELINES = ("solo", "even", "memory-weighted", "edgeshard-greedy")


def baseline(inst: Instance, name: str) -> tuple[list[Stage], Cost]:
    """The baseline's plan and cost; InstanceError when it has no valid plan."""
    builders: dict[str, Callable[[Instance], list[Stage]]] = {
        "solo": _solo,
        "even": lambda i: _weighted(i, [1.0] * len(i.devices)),
        "memory-weighted": lambda i: _weighted(i, [d.mem for d in _ordered(i)]),
        "edgeshard-greedy": _edgeshard_greedy,
    }
    if name not in builders:
        raise InstanceError(f"unknown baseline {name!r}")
    stages = builders[name](inst)
    return stages, evaluate(inst, stages, allow_revisits=name == "edgeshard-greedy")


def _ordered(inst: Instance) -> list[Device]:
    source = inst.device(inst.source)
    return [source, *(d for d in inst.devices if d.name != inst.source)]


def _solo(inst: Instance) -> list[Stage]:
    return [Stage(inst.source, 0, inst.n)]


def _weighted(inst: Instance, weights: list[float]) -> list[Stage]:
    devices = _ordered(inst)
    if len(devices) > inst.n:
        raise InstanceError(f"{len(devices)} devices but only {inst.n} units")
    total = sum(weights)
    if total <= 0:
        raise InstanceError("no device has memory")
    # Largest-remainder rounding, at least one unit each.
    exact = [w / total * inst.n for w in weights]
    counts = [max(1, math.floor(x)) for x in exact]
    while sum(counts) > inst.n:
        i = max((i for i, c in enumerate(counts) if c > 1), key=lambda i: counts[i] - exact[i])
        counts[i] -= 1
    while sum(counts) < inst.n:
        i = max(range(len(counts)), key=lambda i: exact[i] - counts[i])
        counts[i] += 1
    stages, start = [], 0
    for d, c in zip(devices, counts, strict=True):
        stages.append(Stage(d.name, start, start + c))
        start += c
    return stages


def _edgeshard_greedy(inst: Instance) -> list[Stage]:
    names = [d.name for d in inst.devices]
    mem = {d.name: d.mem for d in inst.devices}
    n = inst.n
    inf = math.inf
    # best[i][d]: (latency through unit i ending on d, remaining memory map, path)
    best: list[dict[str, tuple[float, dict[str, float], list[str]]]] = []
    first = inst.units[0]
    src = inst.source
    if not fits(first.mem, mem[src]):
        raise InstanceError("edgeshard-greedy: the source cannot hold the first unit")
    left = dict(mem)
    left[src] -= first.mem
    best.append({src: (inst.device(src).ms[0], left, [src])})
    for i in range(1, n):
        unit = inst.units[i]
        row: dict[str, tuple[float, dict[str, float], list[str]]] = {}
        for d in names:
            choice: tuple[float, dict[str, float], list[str]] | None = None
            for prev, (t, remaining, path) in best[i - 1].items():
                if not fits(unit.mem, remaining[d]):
                    continue
                hop = inst.hop_ms(prev, d, inst.units[i - 1].out_bytes)
                value = t + hop + inst.device(d).ms[i]
                if choice is None or value < choice[0]:
                    choice = (value, remaining, [*path, d])
            if choice is not None:
                remaining = dict(choice[1])
                remaining[d] -= unit.mem
                row[d] = (choice[0], remaining, choice[2])
        if not row:
            raise InstanceError(f"edgeshard-greedy: no device left for unit {unit.name}")
        best.append(row)
    end = min(
        best[-1].items(),
        key=lambda kv: (kv[1][0] + inst.hop_ms(kv[0], src, inst.return_bytes), names.index(kv[0])),
        default=None,
    )
    assert end is not None and end[1][0] < inf
    path = end[1][2]
    stages: list[Stage] = []
    for i, d in enumerate(path):
        if stages and stages[-1].device == d:
            stages[-1] = Stage(d, stages[-1].start, i + 1)
        else:
            stages.append(Stage(d, i, i + 1))
    return stages
