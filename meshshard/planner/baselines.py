"""The plans MeshShard is compared against, under the same cost model.

The EdgeShard paper's (`paper.py`): edge-solo (the source alone), cloud-edge-even and
cloud-edge-opt (the source and the cloud server), edgeshard-latency and edgeshard-throughput
(its two DPs; the latency one may revisit a device and is evaluated as it is). And two
common rules: even (equal units over every device) and memory-weighted (units in proportion
to memory, as exo does). "solo" and "edgeshard-greedy" are older names of edge-solo and
edgeshard-latency, still accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from meshshard.planner import paper
from meshshard.planner.cost import Cost, Stage, evaluate
from meshshard.planner.instance import Device, Instance, InstanceError

BASELINES = (
    "edge-solo",
    "cloud-edge-even",
    "cloud-edge-opt",
    "edgeshard-latency",
    "edgeshard-throughput",
    "even",
    "memory-weighted",
)
OLD_NAMES = {"solo": "edge-solo", "edgeshard-greedy": "edgeshard-latency"}


def baseline(inst: Instance, name: str, objective: str = "latency") -> tuple[list[Stage], Cost]:
    """The baseline's plan and cost; InstanceError when it has no valid plan. `objective`
    is what cloud-edge-opt picks its split point for."""
    name = OLD_NAMES.get(name, name)

    def score(cost: Cost) -> float:
        return cost.latency_ms if objective == "latency" else cost.ms_per_token()

    builders: dict[str, Callable[[Instance], list[Stage]]] = {
        "edge-solo": paper.edge_solo,
        "cloud-edge-even": paper.cloud_edge_even,
        "cloud-edge-opt": lambda i: paper.cloud_edge_opt(i, score),
        "edgeshard-latency": paper.edgeshard_latency,
        "edgeshard-throughput": paper.edgeshard_throughput,
        "even": lambda i: _weighted(i, [1.0] * len(i.devices)),
        "memory-weighted": lambda i: _weighted(i, [d.mem for d in _ordered(i)]),
    }
    if name not in builders:
        raise InstanceError(f"unknown baseline {name!r}")
    stages = builders[name](inst)
    return stages, evaluate(inst, stages, allow_revisits=name == "edgeshard-latency")


def _ordered(inst: Instance) -> list[Device]:
    source = inst.device(inst.source)
    return [source, *(d for d in inst.devices if d.name != inst.source)]


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
