"""The EdgeShard paper's own baselines and algorithms, as its evaluation uses them.

Baselines: Edge-Solo (the source alone), Cloud-Edge-Even (the source and the cloud server,
units split evenly), Cloud-Edge-Opt (the source and the cloud server, the best split point).
Algorithms: its latency DP over (unit, device), which carries each path's remaining memory
greedily and may come back to a device, and its throughput DP over (unit, devices used, last
device), which minimises the pipeline's slowest stage or hop. Both score a plan as the paper
does: compute per unit, one message per hop, and the logits back to the source.
"""

from __future__ import annotations

from collections.abc import Callable

from meshshard.planner.cost import Cost, Stage, evaluate, fits
from meshshard.planner.instance import Instance, InstanceError

# Exact over subsets of devices: 2^devices states per unit and device.
MAX_THROUGHPUT_DEVICES = 12


def edge_solo(inst: Instance) -> list[Stage]:
    return [Stage(inst.source, 0, inst.n)]


def cloud_edge_even(inst: Instance) -> list[Stage]:
    cloud = _cloud(inst)
    half = inst.n // 2
    return [Stage(inst.source, 0, half), Stage(cloud, half, inst.n)]


def cloud_edge_opt(inst: Instance, score: Callable[[Cost], float]) -> list[Stage]:
    """The split point between the source and the cloud server that scores best; the source
    alone or the cloud alone (after the source's first unit) count as split points too."""
    cloud = _cloud(inst)
    best: tuple[float, list[Stage]] | None = None
    for k in range(1, inst.n + 1):
        stages = [Stage(inst.source, 0, k)] + ([Stage(cloud, k, inst.n)] if k < inst.n else [])
        try:
            value = score(evaluate(inst, stages))
        except InstanceError:
            continue  # one side cannot hold its units
        if best is None or value < best[0]:
            best = (value, stages)
    if best is None:
        raise InstanceError("cloud-edge-opt: no split fits the source and the cloud")
    return best[1]


def edgeshard_latency(inst: Instance) -> list[Stage]:
    """Algorithm 1 of the paper: for each unit and device, the fastest path that ends there,
    each path carrying what memory it left on every device; a device may be visited again."""
    names = [d.name for d in inst.devices]
    best: list[dict[str, tuple[float, dict[str, float], list[str]]]] = []
    first, src = inst.units[0], inst.source
    left = {d.name: d.mem for d in inst.devices}
    if not fits(first.mem, left[src]):
        raise InstanceError("edgeshard-latency: the source cannot hold the first unit")
    left[src] -= first.mem
    best.append({src: (inst.device(src).ms[0], left, [src])})
    for i in range(1, inst.n):
        unit = inst.units[i]
        row: dict[str, tuple[float, dict[str, float], list[str]]] = {}
        for d in names:
            choice: tuple[float, dict[str, float], list[str]] | None = None
            for prev, (t, remaining, path) in best[i - 1].items():
                if not fits(unit.mem, remaining[d]):
                    continue
                value = t + inst.hop_ms(prev, d, inst.units[i - 1].out_bytes) + inst.device(d).ms[i]
                if choice is None or value < choice[0]:
                    choice = (value, remaining, [*path, d])
            if choice is not None:
                remaining = dict(choice[1])
                remaining[d] -= unit.mem
                row[d] = (choice[0], remaining, choice[2])
        if not row:
            raise InstanceError(f"edgeshard-latency: no device left for unit {unit.name}")
        best.append(row)
    end = min(
        best[-1].items(),
        key=lambda kv: (kv[1][0] + inst.hop_ms(kv[0], src, inst.return_bytes), names.index(kv[0])),
    )
    return _stages(end[1][2])


def edgeshard_throughput(inst: Instance) -> list[Stage]:
    """Algorithm 2 of the paper: g(i, S, k), the least bottleneck (slowest stage or hop) of
    units [0, i) on the devices S with the last stage on k; a stage [i, j) on a device k'
    not in S adds max(its compute, the hop into it). The first stage is on the source and the
    logits' hop back to it counts. Exact; one-line error past MAX_THROUGHPUT_DEVICES."""
    devices = list(inst.devices)
    if len(devices) > MAX_THROUGHPUT_DEVICES:
        raise InstanceError(
            f"edgeshard-throughput: exact over device subsets, at most "
            f"{MAX_THROUGHPUT_DEVICES} devices (this instance has {len(devices)})"
        )
    n, index = inst.n, {d.name: i for i, d in enumerate(devices)}
    src = index[inst.source]
    prefix_ms = [[0.0] * (n + 1) for _ in devices]
    for k, d in enumerate(devices):
        for u in range(n):
            prefix_ms[k][u + 1] = prefix_ms[k][u] + d.ms[u]
    prefix_mem = [0.0] * (n + 1)
    for u, unit in enumerate(inst.units):
        prefix_mem[u + 1] = prefix_mem[u] + unit.mem
    # g[(end, used, last)] = (bottleneck, previous state, stage start)
    State = tuple[int, int, int]
    g: dict[State, tuple[float, State | None, int]] = {}
    for j in range(1, n + 1):
        if fits(prefix_mem[j], devices[src].mem):
            g[(j, 1 << src, src)] = (prefix_ms[src][j], None, 0)
    for i in range(1, n):
        for (end, used, last), (value, _, _) in [kv for kv in g.items() if kv[0][0] == i]:
            hop_in = [
                inst.hop_ms(devices[last].name, d.name, inst.units[i - 1].out_bytes)
                for d in devices
            ]
            for k, d in enumerate(devices):
                if used >> k & 1:
                    continue
                for j in range(i + 1, n + 1):
                    if not fits(prefix_mem[j] - prefix_mem[i], d.mem):
                        break
                    v = max(value, hop_in[k], prefix_ms[k][j] - prefix_ms[k][i])
                    key = (j, used | 1 << k, k)
                    if key not in g or v < g[key][0]:
                        g[key] = (v, (end, used, last), i)
    finals = [
        (max(v, inst.hop_ms(devices[key[2]].name, inst.source, inst.return_bytes)), key)
        for key, (v, _, _) in g.items()
        if key[0] == n
    ]
    if not finals:
        raise InstanceError("edgeshard-throughput: no plan fits the devices' memory")
    _, state = min(finals, key=lambda f: (f[0], bin(f[1][1]).count("1")))
    stages: list[Stage] = []
    node: State | None = state
    while node is not None:
        _, prev, start = g[node]
        stages.append(Stage(devices[node[2]].name, start, node[0]))
        node = prev
    return stages[::-1]


def _cloud(inst: Instance) -> str:
    cloud = inst.cloud().name
    if cloud == inst.source:
        raise InstanceError("the source is the cloud server: no cloud-edge split")
    return cloud


def _stages(path: list[str]) -> list[Stage]:
    stages: list[Stage] = []
    for i, d in enumerate(path):
        if stages and stages[-1].device == d:
            stages[-1] = Stage(d, stages[-1].start, i + 1)
        else:
            stages.append(Stage(d, i, i + 1))
    return stages
